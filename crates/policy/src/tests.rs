use std::sync::LazyLock;

use proptest::prelude::*;

use super::*;
use crate::lint::{LintOptions, Severity, lint, lint_policy};

static O200K: LazyLock<tiktoken_rs::CoreBPE> =
    LazyLock::new(|| tiktoken_rs::o200k_base().expect("o200k_base is bundled with tiktoken-rs"));

fn count_tokens(text: &str) -> usize {
    O200K.encode_ordinary(text).len()
}

fn exact_opts() -> LintOptions<'static> {
    LintOptions { count_tokens: Some(&count_tokens), ..LintOptions::default() }
}

const GOOD: &str = r#"---
name: demo
version: "2"
output: json
categories: [DM1]
high_risk: true
escalate_on: [DM1.b]
reviewer: alice
---

# Demo Policy (DM)

## INSTRUCTIONS
Return exactly one JSON object: {"violation": 0 or 1, "rule_ids": [...]}.

## DEFINITIONS
- **Thing**: a thing.

## VIOLATES (1)
- DM1.a Selling things.
- **DM1.b** Giving things away with a link.

## DOES NOT VIOLATE (0)
- DM0.a Talking about things, as in DM1.a discussions.

## EXAMPLES
Answer with the JSON object, as in INSTRUCTIONS.
- "buy my thing" -> {"violation": 1, "rule_ids": ["DM1.a"]}
- "I like things" -> {"violation": 0, "rule_ids": ["DM0.a"]}
If unsure, escalate to human review.
"#;

#[test]
fn parses_front_matter_and_body() {
    let policy = Policy::parse(GOOD).unwrap();
    assert_eq!(policy.meta.name, "demo");
    assert_eq!(policy.meta.version.as_deref(), Some("2"));
    assert_eq!(policy.meta.output, OutputFormat::Json);
    assert!(policy.meta.output_declared);
    assert!(policy.meta.high_risk);
    assert_eq!(policy.meta.escalate_on, vec!["DM1.b"]);
    assert_eq!(policy.meta.extra.get("reviewer"), Some(&serde_json::json!("alice")));
    assert!(policy.body.starts_with("# Demo Policy (DM)"));
    assert!(policy.body.ends_with("If unsure, escalate to human review."));
    assert_eq!(policy.body_start_line, 11);
    assert_eq!(policy.sections[0].line, 11);
    assert_eq!(policy.sections.len(), 6);
    assert_eq!(policy.sections[1].title, "INSTRUCTIONS");
    assert_eq!(policy.sections[1].level, 2);
    assert!(policy.sections[3].text.starts_with("- DM1.a Selling things."));
}

#[test]
fn rule_ids_defined_vs_mentioned() {
    let policy = Policy::parse(GOOD).unwrap();
    let defined: Vec<_> = policy.rule_ids.iter().map(String::as_str).collect();
    assert_eq!(defined, vec!["DM0.a", "DM1.a", "DM1.b"]);
    assert!(policy.mentioned_rule_ids.contains("DM1.a"));
    // The heading's "(DM)" has no digits, so it is not a rule id.
    assert!(!policy.mentioned_rule_ids.contains("DM"));
    assert!(policy.knows_rule("DM1"), "a tier prefix of a defined rule is known");
    assert!(!policy.knows_rule("DM2"));
    assert!(!policy.knows_rule("DM1.c"));
}

/// A rule's side comes from the nearest enclosing heading that names one; nested headings, negated headings and
/// a tier whose rules disagree are handled.
#[test]
fn rules_know_which_side_of_the_line_they_are_on() {
    let policy = Policy::parse(
        "# Demo (DM)\n## Instructions\nAnswer 0 or 1.\n## Violates (1)\n- DM1.a Selling.\n### Bulk\n- DM2.a Repeats.\n\
         #### DM2.b Floods\nMany posts.\n## Does not violate (0)\n- DM0.a Questions.\n## Not allowed either\n- DM3.a Lures.\n\
         ## Examples\n- DM9.a An example rule.\n## Mixed\n- DM5.a Under no side.\n",
    )
    .unwrap();
    use crate::RuleSide::{Allowed, Violates};
    let sides: Vec<_> = ["DM1.a", "DM2.a", "DM2.b", "DM2", "DM0.a", "DM3.a", "DM9.a", "DM5.a", "DM7.z"]
        .map(|id| policy.rule_side(id))
        .into();
    assert_eq!(
        sides,
        [
            Some(Violates),
            Some(Violates),
            Some(Violates),
            Some(Violates),
            Some(Allowed),
            Some(Violates),
            None,
            None,
            None
        ]
    );
    let split = Policy::parse("# D\nAnswer 0 or 1.\n## Violates\n- DM1.a X.\n## Safe\n- DM1.b Y.\n").unwrap();
    assert_eq!(split.rule_side("DM1"), None, "a tier with rules on both sides has no side");
    for (title, side) in [
        ("VIOLATES (1)", Some(Violates)),
        ("DOES NOT VIOLATE (0)", Some(Allowed)),
        ("Non-violating content", Some(Allowed)),
        ("Prohibited", Some(Violates)),
        ("Unsafe", Some(Violates)),
        ("Safe (0)", Some(Allowed)),
        ("Exceptions", Some(Allowed)),
        ("Label 1 (1)", Some(Violates)),
        ("Definitions", None),
        ("Doesn't violate (0)", Some(Allowed)),
        ("Not a violation", Some(Allowed)),
        ("Non violating", Some(Allowed)),
        ("Unacceptable content", Some(Violates)),
        ("Never allowed", Some(Violates)),
        ("Isn\u{2019}t allowed", Some(Violates)),
        ("Not safe", Some(Violates)),
        ("Child Safety", None),
        ("Exceptional severity", None),
        ("Violations and exceptions", None),
        ("What does not count as a violation", Some(Allowed)),
        ("Not considered a violation", Some(Allowed)),
        ("Content that is not treated as a violation", Some(Allowed)),
        ("Not in scope, allowed", Some(Allowed)),
        ("What counts as a violation", Some(Violates)),
    ] {
        assert_eq!(crate::RuleSide::of_heading(title), side, "{title}");
    }
    // The title says nothing about sides, a heading naming a rule describes the rule, and a policy whose headings
    // show only one side is not read at all.
    let titled = Policy::parse(
        "# Child Safety Policy (CS)\nAnswer 0 or 1.\n## Tier 2\n- CS2.a Grooming.\n### CS3.a Minors, never acceptable\nX.\n",
    )
    .unwrap();
    assert_eq!((titled.rule_side("CS2.a"), titled.rule_side("CS3.a")), (None, None));
    let one_sided = Policy::parse("# D\nAnswer 0 or 1.\n## Violates\n- DM1.a X.\n## Other\n- DM2.a Y.\n").unwrap();
    assert_eq!(one_sided.rule_side("DM1.a"), None);
    // Headings labelled (1) and (0) are trusted even when only one side lists rules.
    let labelled =
        Policy::parse("# P\nAnswer 0 or 1.\n## VIOLATES (1)\n- PR1.a Cold promotion.\n## SAFE (0)\nEverything else.\n")
            .unwrap();
    assert_eq!(labelled.rule_side("PR1.a"), Some(Violates));
    for starter in crate::starter_library() {
        let violating = starter.rule_ids.iter().filter(|id| starter.rule_side(id) == Some(Violates)).count();
        let allowed = starter.rule_ids.iter().filter(|id| starter.rule_side(id) == Some(Allowed)).count();
        assert!(violating > 0 && allowed > 0, "{}: {violating} violating, {allowed} allowed", starter.meta.name);
    }
}

#[test]
fn rule_id_shapes() {
    let ids: Vec<_> = markdown::find_rule_ids("SP2.a, H2.f (SP0) D-SP3 V3.b. GPT4o xSP2 ABCDE1 SP2.A H2O")
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids, vec!["SP2.a", "H2.f", "SP0", "SP3", "V3.b", "SP2"]);
    assert!(markdown::is_rule_id("HT3.a"));
    assert!(!markdown::is_rule_id("HT3.a "));
    assert!(!markdown::is_rule_id("ht3"));
}

#[test]
fn headings_inside_code_fences_are_ignored() {
    let policy = Policy::parse(
        "# P\nReturn 0 or 1.\n```\n# not a heading\n- XX1.a not a definition\n```\n## Real\n- AB1 defined\n",
    )
    .unwrap();
    let titles: Vec<_> = policy.sections.iter().map(|s| s.title.as_str()).collect();
    assert_eq!(titles, vec!["P", "Real"]);
    assert!(policy.rule_ids.contains("AB1"));
    assert!(!policy.rule_ids.contains("XX1.a"));
    assert!(policy.mentioned_rule_ids.contains("XX1.a"));
}

#[test]
fn hash_depends_on_body_only() {
    let with_meta = Policy::parse(GOOD).unwrap();
    let other_meta = GOOD.replace("name: demo", "name: renamed").replace("version: \"2\"", "version: \"3\"");
    let renamed = Policy::parse(&other_meta).unwrap();
    assert_eq!(with_meta.hash, renamed.hash);
    assert_ne!(with_meta.meta.name, renamed.meta.name);

    let body_only = Policy::parse(&format!("\n\n{}\n\n", with_meta.body)).unwrap();
    assert_eq!(body_only.hash, with_meta.hash, "surrounding whitespace is not part of the body");

    let crlf = Policy::parse(&GOOD.replace('\n', "\r\n")).unwrap();
    assert_eq!(crlf.hash, with_meta.hash, "CRLF line ends hash like LF");

    let edited = Policy::parse(&GOOD.replace("Selling things.", "Selling things!")).unwrap();
    assert_ne!(edited.hash, with_meta.hash);

    let hash = &with_meta.hash;
    assert!(hash.to_string().starts_with("sha256:"));
    assert_eq!(hash.hex().len(), 64);
    assert_eq!(hash.short().len(), 12);
    assert_eq!(hash.to_string(), format!("sha256:{}", hex::encode(Sha256::digest(with_meta.body.as_bytes()))));
}

#[test]
fn name_falls_back_to_heading_then_stem() {
    let policy = Policy::parse("# Spam Policy (#SP)\nReturn exactly one character: 0 or 1.").unwrap();
    assert_eq!(policy.meta.name, "Spam Policy (#SP)");
    let policy = Policy::parse_with_fallback_name("Return 0 or 1 for spam.", Some("spam")).unwrap();
    assert_eq!(policy.meta.name, "spam");
    assert!(matches!(Policy::parse("Return 0 or 1 for spam."), Err(PolicyError::NoName)));
}

#[test]
fn output_format_is_inferred_or_demanded() {
    let binary = Policy::parse("# P\nAnswer (0 or 1):").unwrap();
    assert_eq!(binary.meta.output, OutputFormat::Binary);
    assert!(!binary.meta.output_declared);
    let json = Policy::parse("# P\nReturn {\"violation\": 0 or 1, \"policy_category\": null}").unwrap();
    assert_eq!(json.meta.output, OutputFormat::Json);
    let labels = Policy::parse("# P\nAnswer VALID, INVALID or INVALID + ESCALATE.").unwrap();
    assert_eq!(
        labels.meta.output,
        OutputFormat::Labels {
            violating: vec!["INVALID".into()],
            safe: vec!["VALID".into()],
            escalate: vec!["INVALID + ESCALATE".into()]
        }
    );
    let err = Policy::parse("# P\nDecide if this is bad.").unwrap_err();
    assert!(matches!(err, PolicyError::UndeterminedOutput));
    assert!(err.to_string().contains("front matter"), "{err}");

    let declared = Policy::parse(
        "---\noutput: labels\nlabels:\n  violating: [BLOCK]\n  safe: [OK]\n  escalate: [REVIEW]\n---\n# P\nSay OK or BLOCK.",
    )
    .unwrap();
    assert_eq!(
        declared.meta.output,
        OutputFormat::Labels {
            violating: vec!["BLOCK".into()],
            safe: vec!["OK".into()],
            escalate: vec!["REVIEW".into()]
        }
    );
    let inline = Policy::parse("---\noutput: {format: labels, violating: BAD, safe: GOOD}\n---\n# P\nSay it.").unwrap();
    assert!(matches!(inline.meta.output, OutputFormat::Labels { ref violating, .. } if violating == &["BAD"]));
}

#[test]
fn a_nul_character_is_refused_with_its_line() {
    let err = Policy::parse("# P\nReturn 0 or 1.\nBad \0 byte.").unwrap_err();
    assert!(matches!(err, PolicyError::NulCharacter { line: 3 }), "{err:?}");
}

/// A blank label would be the answer of a model that wrote only punctuation ("**", "."), and a label on both sides
/// has no meaning: a policy declaring either is refused, saying which.
#[test]
fn blank_labels_and_labels_on_both_sides_are_refused() {
    for labels in
        ["violating: [SPAM]\n  safe: ['']", "violating: [SPAM]\n  safe: ['  ']", "violating: [SPAM, ' ']\n  safe: [OK]"]
    {
        let text = format!("---\noutput: labels\nlabels:\n  {labels}\n---\n# P\nSay SPAM or OK.");
        let err = Policy::parse(&text).unwrap_err();
        assert!(err.to_string().contains("blank"), "{labels}: {err}");
    }
    let text = "---\noutput: labels\nlabels:\n  violating: [Spam]\n  safe: [OK, ' SPAM ']\n---\n# P\nSay SPAM or OK.";
    let err = Policy::parse(text).unwrap_err();
    assert!(err.to_string().contains("both"), "{err}");
    let spaced = "---\noutput: labels\nlabels:\n  violating: [A+B]\n  safe: [a + b]\n---\n# P\nSay A+B.";
    assert!(Policy::parse(spaced).unwrap_err().to_string().contains("both"), "a `+` reads as the verdict reads it");
    // A version stored before the checks still reads.
    let stored = "---\noutput: labels\nlabels:\n  violating: [SPAM]\n  safe: ['']\n---\n# P\nSay SPAM.";
    assert!(Policy::parse_stored(stored, None).is_ok());
}

#[test]
fn front_matter_errors_carry_lines() {
    let err = Policy::parse("---\nname: x\n# P\n").unwrap_err();
    assert!(matches!(err, PolicyError::UnclosedFrontMatter { line: 1 }), "{err:?}");

    let err = Policy::parse("---\nname: x\nversion: [1, 2\n---\n# P\nReturn 0 or 1.").unwrap_err();
    assert!(matches!(err, PolicyError::FrontMatter { .. }), "{err:?}");
    assert!(matches!(err.line(), Some(3..=4)), "{err:?} line {:?}", err.line());

    let err = Policy::parse("---\nname: x\nhigh_risk: maybe\n---\n# P\nReturn 0 or 1.").unwrap_err();
    assert!(matches!(err, PolicyError::FrontMatterField { ref field, line: 3, .. } if field == "high_risk"), "{err:?}");

    let err = Policy::parse("---\noutput: xml\n---\n# P\n").unwrap_err();
    assert!(matches!(err, PolicyError::FrontMatterField { line: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("xml"));

    let err = Policy::parse("---\noutput: labels\n---\n# P\nSay it.").unwrap_err();
    assert!(matches!(err, PolicyError::FrontMatterField { .. }), "{err:?}");

    let err = Policy::parse("---\n- a\n- b\n---\n# P\nReturn 0 or 1.").unwrap_err();
    assert!(matches!(err, PolicyError::FrontMatter { line: 2, .. }), "{err:?}");

    // A section JSON cannot hold (a complex key) is refused, not dropped: the policy would run on defaults.
    let err =
        Policy::parse("---\nname: p\noutput: binary\nrouting:\n  ? [a]\n  : b\n---\n# P\nReturn 0 or 1.").unwrap_err();
    assert!(matches!(err, PolicyError::FrontMatterField { ref field, line: 4, .. } if field == "routing"), "{err:?}");
}

/// Aliases made serde_yaml_ng replay what they name: 60 KB of front matter became 1.4e8 values (gigabytes), from
/// any client sending a policy inline. Anchors and aliases are refused before anything is expanded, on the line
/// of the first one.
#[test]
fn yaml_anchors_and_aliases_are_refused_before_expansion() {
    let reused = "---\nname: p\noutput: binary\ncategories: &cats [A1]\ntags: *cats\n---\n# P\nReturn 0 or 1.";
    let err = Policy::parse(reused).unwrap_err();
    assert!(matches!(err, PolicyError::FrontMatter { line: 4, .. }), "{err:?}");
    assert!(err.to_string().contains("aliases"), "{err}");

    // An alias alone (its anchor undefined) is refused on its own line, in flow and block collections alike.
    let err = Policy::parse("---\nname: p\ntags:\n  - a\n  - *x\n---\n# P\nReturn 0 or 1.").unwrap_err();
    assert!(matches!(err, PolicyError::FrontMatter { line: 5, .. }), "{err:?}");
    let err =
        Policy::parse("---\nname: p\ntriage: {rules: {allow_list: [hi, *x]}}\n---\n# P\nReturn 0 or 1.").unwrap_err();
    assert!(matches!(err, PolicyError::FrontMatter { line: 3, .. }), "{err:?}");
}

/// The bomb itself: under serde_yaml_ng, 1.4e8 values. Refused on the anchor's line, in well under a second.
#[test]
fn yaml_alias_bomb_is_refused_quickly() {
    let bomb = format!(
        "---\nname: p\nlist: &a [{}]\nbomb: [{}]\n---\n# P\nReturn 0 or 1.",
        vec!["x"; 20_000].join(","),
        vec!["*a"; 7_000].join(",")
    );
    assert!(bomb.len() < MAX_FRONT_MATTER_BYTES, "refused for its aliases, not its size");
    let started = std::time::Instant::now();
    // Not `unwrap_err`: a policy that parsed would be printed whole.
    let Err(err) = Policy::parse(&bomb) else { panic!("an alias bomb parsed") };
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(matches!(err, PolicyError::FrontMatter { line: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("aliases"), "{err}");
}

/// `*` and `&` are only YAML syntax where a node starts: in quotes, block scalars, comments and mid-word they are
/// text, and a policy using them still parses.
#[test]
fn stars_and_ampersands_in_front_matter_text_still_parse() {
    let policy = Policy::parse(
        "---\nname: \"*star\"\ndescription: 'R&D, *x and &y'\nowner: R&D\ntags: [\"*\", '&x', a*b]\n\
         notes: |\n  *not an alias*\n  &not an anchor\n# *x &y\noutput: binary\n---\n# P\nReturn 0 or 1.",
    )
    .unwrap();
    assert_eq!(policy.meta.name, "*star");
    assert_eq!(policy.meta.description.as_deref(), Some("R&D, *x and &y"));
    assert_eq!(policy.meta.owner.as_deref(), Some("R&D"));
    assert_eq!(policy.meta.tags, ["*", "&x", "a*b"]);
    assert_eq!(policy.meta.extra["notes"], serde_json::json!("*not an alias*\n&not an anchor\n"));
}

/// A version stored before anchors were refused still parses from the store, and hashes as it did.
#[test]
fn stored_versions_skip_the_newer_front_matter_checks() {
    let text = "---\nname: p\ndescription: &d shared\nowner: *d\n---\n# P\nReturn 0 or 1.";
    assert!(Policy::parse(text).is_err());
    let stored = Policy::parse_stored(text, None).unwrap();
    assert_eq!(stored.hash, PolicyHash::of_body("# P\nReturn 0 or 1."));
    assert_eq!(stored.meta.owner.as_deref(), Some("shared"));
    let big = format!("---\nnotes: {}\n---\n# P\nReturn 0 or 1.", "a".repeat(MAX_FRONT_MATTER_BYTES));
    assert!(Policy::parse(&big).is_err() && Policy::parse_stored(&big, None).is_ok());
}

#[test]
fn oversized_front_matter_is_refused() {
    let with_notes = |bytes: usize| format!("---\nnotes: {}\n---\n# P\nReturn 0 or 1.", "a".repeat(bytes));
    let at_limit = with_notes(MAX_FRONT_MATTER_BYTES - "notes: \n".len());
    assert!(Policy::parse(&at_limit).is_ok());
    let Err(err) = Policy::parse(&with_notes(MAX_FRONT_MATTER_BYTES)) else { panic!("oversized front matter parsed") };
    assert!(
        matches!(err, PolicyError::FrontMatterTooLarge { bytes, limit: MAX_FRONT_MATTER_BYTES }
            if bytes == MAX_FRONT_MATTER_BYTES + "notes: \n".len()),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("{MAX_FRONT_MATTER_BYTES}-byte limit")), "{err}");
}

#[test]
fn empty_body_is_an_error() {
    let err = Policy::parse("---\nname: x\n---\n\n   \n").unwrap_err();
    assert!(matches!(err, PolicyError::EmptyBody { line: 4 }), "{err:?}");
    assert!(matches!(Policy::parse("  \n\t"), Err(PolicyError::EmptyBody { line: 1 })));
}

#[test]
fn load_reports_invalid_utf8_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.md");
    std::fs::write(&bad, b"# P\nReturn 0 or 1.\nab\xffcd\n").unwrap();
    let err = Policy::load(&bad).unwrap_err();
    let PolicyError::InFile { source, .. } = &err else { panic!("{err:?}") };
    assert!(matches!(**source, PolicyError::InvalidUtf8 { line: 3, column: 3, .. }), "{source:?}");
    assert!(err.to_string().contains("bad.md"));

    let big = dir.path().join("big.md");
    std::fs::write(&big, "a".repeat(MAX_POLICY_BYTES + 1)).unwrap();
    let err = Policy::load(&big).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    assert!(matches!(Policy::parse(&"a".repeat(MAX_POLICY_BYTES + 1)), Err(PolicyError::TooLarge { .. })));

    let stem = dir.path().join("my-policy.md");
    std::fs::write(&stem, "Return 0 or 1.").unwrap();
    assert_eq!(Policy::load(&stem).unwrap().meta.name, "my-policy");

    let missing = Policy::load(&dir.path().join("nope.md")).unwrap_err();
    assert!(matches!(missing, PolicyError::Io { .. }));
}

#[test]
fn lint_good_policy_has_only_length_warning() {
    let report = lint(GOOD, &exact_opts());
    let codes: Vec<_> = report.findings.iter().map(|f| f.code.as_str()).collect();
    assert_eq!(codes, vec!["length-outside-sweet-spot"], "{:#?}", report.findings);
    assert!(report.tokens_exact);
    assert!(!report.has_errors());
}

const BAD: &str = r#"# Bad Policy
## Rules
- BD1.a Posts that usually contain insults.
- BD1.a Posts that might be rude.
## Examples
- "you are dumb" (BD9.z)
- "hello there"
"#;

#[test]
fn lint_bad_policy_finds_each_problem() {
    let report = lint(&format!("---\noutput: binary\nescalate_on: [BD1, bd2]\n---\n{BAD}"), &exact_opts());
    let codes: Vec<_> = report.findings.iter().map(|f| f.code.as_str()).collect();
    let escalate_on: Vec<&str> =
        report.findings.iter().filter(|f| f.code == "undefined-escalate-on").map(|f| f.message.as_str()).collect();
    assert!(matches!(escalate_on.as_slice(), [message] if message.contains("bd2")), "{escalate_on:?}");
    for expected in [
        "missing-instructions",
        "missing-output-format",
        "duplicate-rule-id",
        "undefined-rule-id",
        "hedge-word",
        "missing-definitions",
        "missing-safe-criteria",
        "unlabeled-example",
        "no-escalation-path",
        "length-outside-sweet-spot",
    ] {
        assert!(codes.contains(&expected), "missing {expected} in {codes:?}");
    }
    assert!(report.has_errors());
    let dup = report.findings.iter().find(|f| f.code == "duplicate-rule-id").unwrap();
    assert_eq!(dup.line, Some(8), "file line of the second definition");
    let hedges: Vec<_> = report.findings.iter().filter(|f| f.code == "hedge-word").filter_map(|f| f.line).collect();
    assert_eq!(hedges, vec![7, 8]);
    let undefined = report.findings.iter().find(|f| f.code == "undefined-rule-id").unwrap();
    assert!(undefined.message.contains("BD9.z") && undefined.message.contains("example"));
    // Both examples lack labels? No: "(BD9.z)" is no label, and neither is the second.
    assert_eq!(report.findings.iter().filter(|f| f.code == "unlabeled-example").count(), 2);
    // Errors sort before warnings.
    let first_warning = report.findings.iter().position(|f| f.severity == Severity::Warning).unwrap();
    assert!(report.findings[..first_warning].iter().all(|f| f.severity == Severity::Error));
}

/// A complete binary policy around the given criteria headings; `None` leaves the safe side out.
fn sided_policy(violating: &str, safe: Option<&str>) -> String {
    let safe = safe.map_or(String::new(), |title| format!("## {title}\n- DM0.a Talking about things.\n"));
    format!(
        "# Demo Policy (DM)\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n## DEFINITIONS\n- **Thing**: a thing.\n\
         ## {violating}\n- DM1.a Selling things.\n{safe}## EXAMPLES\nReturn exactly one character: 0 or 1.\n\
         - \"buy my thing\" -> 1\nIf unsure, escalate to human review.\n"
    )
}

/// Two common ways of writing labelled examples read as labelled: a label given as its own bullet after the content,
/// and examples as sub-headings under an introduced EXAMPLES heading (the introduction is no example).
#[test]
fn lint_reads_label_bullets_and_introduced_sub_headings_as_labelled_examples() {
    let bullets = sided_policy("VIOLATES (1)", Some("SAFE (0)")).replace(
        "- \"buy my thing\" -> 1\n",
        "- Content: \"buy my thing\"\n- Label: 1\n- Content: \"nice thing\"\n- **Answer**: 0\n",
    );
    assert!(!codes(&lint(&bullets, &LintOptions::default())).contains(&"unlabeled-example"), "{bullets}");
    let unlabelled = bullets.replace("- **Answer**: 0\n", "");
    let report = lint(&unlabelled, &LintOptions::default());
    assert_eq!(codes(&report).iter().filter(|&&code| code == "unlabeled-example").count(), 1, "{unlabelled}");

    let headed = sided_policy("VIOLATES (1)", Some("SAFE (0)")).replace(
        "## EXAMPLES\nReturn exactly one character: 0 or 1.\n- \"buy my thing\" -> 1\n",
        "## EXAMPLES\nThe cases below sit near the boundary.\n### Example 1\nbuy my thing\nExpected: 1\n\
         ### Example 2\nnice thing\n",
    );
    assert!(headed.contains("### Example 2"), "{headed}");
    let report = lint(&headed, &LintOptions::default());
    let unlabelled: Vec<_> = report.findings.iter().filter(|f| f.code == "unlabeled-example").map(|f| f.line).collect();
    assert_eq!(unlabelled.len(), 1, "only Example 2 lacks a label: {:#?}", report.findings);
}

fn codes(report: &crate::lint::LintReport) -> Vec<&str> {
    report.findings.iter().map(|f| f.code.as_str()).collect()
}

/// "DISALLOWED" holds "allowed" and "UNSAFE" holds "safe": read as substrings, criteria headings became the safe
/// side, the policy got a missing-criteria error and a really missing safe side went unreported.
#[test]
fn lint_reads_negated_headings_as_criteria() {
    for (violating, safe) in [
        ("DISALLOWED (1)", "ALLOWED (0)"),
        ("DISALLOWED CONTENT (1)", "ALLOWED (0)"),
        ("UNSAFE (1)", "SAFE (0)"),
        ("NOT PERMITTED", "PERMITTED"),
    ] {
        let report = lint(&sided_policy(violating, Some(safe)), &LintOptions::default());
        assert_eq!(codes(&report), vec!["length-outside-sweet-spot"], "{violating} / {safe}");
        let report = lint(&sided_policy(violating, None), &LintOptions::default());
        assert_eq!(codes(&report), vec!["length-outside-sweet-spot", "missing-safe-criteria"], "{violating}");
    }
    // A title is no criteria section either: "Safety" is not "safe".
    let titled = sided_policy("VIOLATES (1)", None).replace("# Demo Policy", "# Child Safety Policy");
    assert!(codes(&lint(&titled, &LintOptions::default())).contains(&"missing-safe-criteria"));
}

/// Product names, standards and formulas are rule-id-shaped, and bold text or a heading that mentions a defined
/// rule cites it: neither is an error.
#[test]
fn lint_rule_id_lookalikes_and_citations_are_not_errors() {
    let spam = STARTER_POLICIES[0].source;
    let text = spam
        .replace(
            "Do not include any explanation or punctuation.",
            "Do not include any explanation or punctuation.\n```\n{\"rule_ids\": [\"SP9.x\"]}\n```",
        )
        .replace("however polite.", "however polite. Content matching **SP4.a** always gets 1.")
        .replace(
            "- \"Can anyone recommend",
            "- \"Win a free PS5!\" -> 1\n- \"N95 masks, CO2 meters, MP3s, F1 tickets, ISO27001 audits, all free\" -> 1\n\
             ### Examples for SP2.a\n- \"Can anyone recommend",
        );
    assert_ne!(text, spam);
    let report = lint(&text, &exact_opts());
    assert!(!report.has_errors(), "{:#?}", report.findings);
    assert!(!codes(&report).contains(&"unknown-rule-prefix"), "{:#?}", report.findings);
    let policy = Policy::parse(&text).unwrap();
    for id in ["SP2.a", "SP4.a"] {
        assert_eq!(policy.rule_definitions.iter().filter(|d| d.rule_id == id).count(), 1, "{id}");
        // A citation under a heading with no side used to count as a definition there, and take the side away.
        assert_eq!(policy.rule_side(id), Some(RuleSide::Violates), "{id}");
    }
    assert!(!policy.rule_ids.contains("PS5") && !policy.rule_ids.contains("SP9.x"));
}

#[test]
fn lint_still_reports_real_duplicates_and_missing_rules() {
    let text = STARTER_POLICIES[0]
        .source
        .replace(
            "- SP3.a Deceptive offers",
            "- SP2.a Bulk promotion, defined twice.\n### SP3.a Deceptive offers, defined twice\n- SP3.a Deceptive offers",
        )
        .replace("however polite.", "however polite. Content matching **SP7.a** always gets 1.")
        .replace(
            "- \"Can anyone recommend",
            "- \"Get rich quick\" -> 1 (SP9.z)\n- \"Hot singles\" -> 1 (SX2.a)\n\
             - \"Pump alert: SP500 calls, 10x guaranteed\" -> 1 (SP9.z)\n### Examples for SP8.a\n- \"Can anyone recommend",
        );
    let report = lint(&text, &exact_opts());
    let found = |code: &str| -> Vec<String> {
        report.findings.iter().filter(|f| f.code == code).map(|f| format!("{} {}", f.severity, f.message)).collect()
    };
    let duplicates = found("duplicate-rule-id");
    assert_eq!(duplicates.len(), 2, "{duplicates:?}");
    assert!(duplicates[0].starts_with("error rule id SP2.a") && duplicates[1].starts_with("error rule id SP3.a"));
    let undefined = found("undefined-rule-id");
    for id in ["SP7.a", "SP8.a", "SP9.z"] {
        assert!(undefined.iter().any(|m| m.starts_with(&format!("error rule id {id} "))), "{id}: {undefined:?}");
    }
    assert_eq!(undefined.len(), 3, "{undefined:?}");
    let foreign = found("unknown-rule-prefix");
    assert!(
        matches!(foreign.as_slice(), [one] if one.starts_with("warning SX2.a") && one.contains("SP")),
        "{foreign:?}"
    );
    // A policy that defines nothing still announces its prefix in its title.
    let bare = "# Spam Policy (SP)\n## INSTRUCTIONS\nReturn 0 or 1.\n## VIOLATES (1)\nSpam, as in SP2.\n";
    assert!(codes(&lint(bare, &LintOptions::default())).contains(&"undefined-rule-id"));
}

/// Headings alone pass for sections: a VIOLATES heading with nothing under it is a policy with no criteria.
#[test]
fn lint_reports_empty_sections() {
    let text = "# P\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n## DEFINITIONS\n- **T**: t.\n\
                ## VIOLATES (1)\n\n## DOES NOT VIOLATE (0)\n- DM0.a Fine.\n## EXAMPLES\n## Notes\n\
                If unsure, escalate to human review.\n";
    let report = lint(text, &LintOptions::default());
    let empty: Vec<_> =
        report.findings.iter().filter(|f| f.code == "empty-section").map(|f| (f.severity, f.line)).collect();
    assert_eq!(empty, vec![(Severity::Error, Some(6)), (Severity::Warning, Some(10))], "{:#?}", report.findings);
    assert!(!codes(&report).contains(&"missing-criteria"));

    // Criteria in a sub-section fill their parent; another filled criteria section makes an empty one a warning.
    let nested = text.replace("## VIOLATES (1)\n\n", "## VIOLATES (1)\n### Tier 1\n- DM1.a Selling.\n## PROHIBITED\n");
    let report = lint(&nested, &LintOptions::default());
    let empty: Vec<_> =
        report.findings.iter().filter(|f| f.code == "empty-section").map(|f| (f.severity, f.line)).collect();
    assert_eq!(empty, vec![(Severity::Warning, Some(9)), (Severity::Warning, Some(12))], "{:#?}", report.findings);
}

#[test]
fn lint_token_limits() {
    let long = format!("{GOOD}\n{}", "More words about things here. ".repeat(400));
    let opts = LintOptions { max_tokens: 1_000, ..exact_opts() };
    let report = lint(&long, &opts);
    assert!(report.findings.iter().any(|f| f.code == "too-long" && f.severity == Severity::Error));
    let approx = lint(GOOD, &LintOptions::default());
    assert!(!approx.tokens_exact);
    let warning = approx.findings.iter().find(|f| f.code == "length-outside-sweet-spot").unwrap();
    assert!(warning.message.contains("estimated"));
}

#[test]
fn lint_output_format_stated_once_and_mismatch() {
    let text = "---\noutput: binary\n---\n# P\n## INSTRUCTIONS\nReturn 0 or 1.\n## DEFINITIONS\nx\n## VIOLATES\n- AA1 bad\n## SAFE\n- AA0 good\n## EXAMPLES\n- \"x\" -> 1\nEscalate if unsure.";
    let report = lint(text, &exact_opts());
    let once = report.findings.iter().find(|f| f.code == "output-format-stated-once").unwrap();
    assert_eq!(once.line, Some(6));
    let json_declared =
        text.replace("output: binary", "output: json").replace("Return 0 or 1.", "Return JSON {\"violation\": 1}.");
    let report = lint(&json_declared, &exact_opts());
    assert!(!report.findings.iter().any(|f| f.code == "output-format-mismatch"), "{:#?}", report.findings);
    let mismatched = text.replace("output: binary", "output: json");
    let report = lint(&mismatched, &exact_opts());
    assert!(report.findings.iter().any(|f| f.code == "output-format-mismatch"));
    assert!(report.findings.iter().any(|f| f.code == "missing-output-format"));
}

#[test]
fn lint_parse_errors_become_findings() {
    let report = lint("---\nname: x\n", &LintOptions::default());
    assert_eq!(report.findings.len(), 1);
    assert_eq!(report.findings[0].code, "parse-error");
    assert_eq!(report.findings[0].line, Some(1));
}

#[test]
fn starter_library_parses_and_lints_clean() {
    let library = starter_library();
    assert_eq!(library.len(), STARTER_POLICIES.len());
    let names: Vec<_> = library.iter().map(|p| p.meta.name.as_str()).collect();
    assert_eq!(names, vec!["spam", "hate", "harassment", "violence", "self-harm", "sexual", "prompt-injection"]);
    for policy in &library {
        let report = lint_policy(policy, &exact_opts());
        let tokens = report.tokens.unwrap();
        assert!(report.is_clean(), "{} ({tokens} tokens): {:#?}", policy.meta.name, report.findings);
        assert!((400..=600).contains(&tokens), "{}: {tokens} tokens", policy.meta.name);
        assert!(policy.meta.output_declared, "{}", policy.meta.name);
        assert!(policy.rule_ids.len() >= 8, "{}", policy.meta.name);
        assert_eq!(
            policy.mentioned_rule_ids.difference(&policy.rule_ids).filter(|id| !policy.knows_rule(id)).count(),
            0
        );
        for category in &policy.meta.categories {
            assert!(policy.knows_rule(category), "{}: category {category} is not a rule tier", policy.meta.name);
        }
        for escalate in &policy.meta.escalate_on {
            assert!(policy.knows_rule(escalate), "{}: escalate_on {escalate} unknown", policy.meta.name);
        }
    }
    let spam = library.iter().find(|p| p.meta.name == "spam").unwrap();
    assert_eq!(spam.meta.output, OutputFormat::Binary);
    let sexual = library.iter().find(|p| p.meta.name == "sexual").unwrap();
    assert_eq!(sexual.meta.severities.last().map(String::as_str), Some("critical"));
    assert_eq!(sexual.meta.escalate_on, vec!["SX3"]);
    assert!(sexual.rule_ids.iter().any(|id| id.starts_with("SX3")));
}

#[test]
fn starter_golden_tests_are_well_formed() {
    for starter in STARTER_POLICIES {
        let mut ids = std::collections::BTreeSet::new();
        let mut expected = std::collections::BTreeMap::<String, usize>::new();
        for line in starter.tests.lines().filter(|line| !line.trim().is_empty()) {
            let case: serde_json::Value = serde_json::from_str(line).unwrap();
            let id = case["id"].as_str().unwrap();
            assert!(ids.insert(id.to_string()), "{}: duplicate id {id}", starter.file_name);
            assert!(!case["text"].as_str().unwrap().trim().is_empty());
            let label = case["expected"].as_str().unwrap();
            assert!(label == "violation" || label == "allow", "{}: {label}", starter.file_name);
            *expected.entry(label.to_string()).or_default() += 1;
        }
        assert!((6..=10).contains(&ids.len()), "{}: {} cases", starter.file_name, ids.len());
        assert!(expected.get("violation").copied().unwrap_or(0) >= 3, "{}", starter.file_name);
        assert!(expected.get("allow").copied().unwrap_or(0) >= 3, "{}", starter.file_name);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics(text in "\\PC*") {
        let _ = Policy::parse(&text);
        let _ = lint(&text, &LintOptions::default());
    }

    #[test]
    fn parse_never_panics_on_policy_shaped_text(
        lines in proptest::collection::vec(
            prop_oneof![
                Just("---".to_string()), Just("```".to_string()), Just("# T".to_string()),
                Just("## VIOLATES".to_string()), Just("- SP1.a x".to_string()), Just("output: json".to_string()),
                Just("Return 0 or 1.".to_string()), "[ -~]{0,20}".prop_map(|s| s), Just("**AB2** y".to_string()),
            ],
            0..20,
        )
    ) {
        let text = lines.join("\n");
        let _ = Policy::parse(&text);
        let _ = lint(&text, &LintOptions::default());
    }

    #[test]
    fn hash_is_stable_and_front_matter_blind(body in "[a-zA-Z0-9 .,]{1,200}", name in "[a-z]{1,10}") {
        let body = format!("# T\nReturn 0 or 1. {body}");
        let plain = Policy::parse(&body).unwrap();
        let again = Policy::parse(&body).unwrap();
        prop_assert_eq!(&plain.hash, &again.hash);
        let with_meta = Policy::parse(&format!("---\nname: {name}\n---\n{body}\n")).unwrap();
        prop_assert_eq!(&plain.hash, &with_meta.hash);
        prop_assert_eq!(plain.hash.clone(), PolicyHash::of_body(plain.body.trim()));
    }
}

/// `cargo test -p safeguard-policy token_report -- --ignored --nocapture`: body and per-section token counts of
/// the policy files on disk, for editing the starter library without recompiling.
#[test]
#[ignore]
fn token_report() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    paths.sort();
    for path in paths {
        let policy = Policy::load(&path).unwrap();
        let report = lint_policy(&policy, &exact_opts());
        eprintln!(
            "{}: {} tokens, findings {:?}",
            policy.meta.name,
            report.tokens.unwrap(),
            report.findings.iter().map(|f| (&f.code, f.line)).collect::<Vec<_>>()
        );
        for section in &policy.sections {
            eprintln!("    {:>4}  {}", count_tokens(&section.text) + count_tokens(&section.title), section.title);
        }
    }
}

/// A megabyte of one-character headings is no policy, and would parse into half a million sections from any client
/// allowed to send one inline; versions stored before the cap must still load.
#[test]
fn too_many_headings_or_rules_are_refused_but_stored_versions_load() {
    let headings = format!("# Flood\nAnswer 0 or 1.\n{}", "## x\n".repeat(MAX_SECTIONS));
    let err = Policy::parse(&headings).unwrap_err();
    assert!(matches!(err, PolicyError::TooManyParts { what: "headings", .. }), "{err}");
    let stored = Policy::parse_stored(&headings, None).unwrap();
    assert_eq!(stored.sections.len(), MAX_SECTIONS + 1);
    assert!(
        stored.approx_heap_bytes() > 20 * headings.len(),
        "the estimate counts what the parts cost, not only the body: {} for {} bytes",
        stored.approx_heap_bytes(),
        headings.len()
    );

    let rules: String = (0..=MAX_RULE_DEFINITIONS).map(|i| format!("- FL{i}.a Rule.\n")).collect();
    let err = Policy::parse(&format!("# Flood\nAnswer 0 or 1.\n## Violates\n{rules}")).unwrap_err();
    assert!(matches!(err, PolicyError::TooManyParts { what: "rule definitions", .. }), "{err}");
    assert!(Policy::parse(&format!("# Fine\nAnswer 0 or 1.\n{}", "## x\n".repeat(MAX_SECTIONS - 1))).is_ok());
}

/// The one-pass reading of headings agrees with walking back from each definition through every heading above it
/// (what it replaced), on every starter policy.
#[test]
fn rule_sides_in_one_pass_agree_with_walking_back_from_each_rule() {
    fn walking_back(policy: &Policy, line: usize) -> Option<RuleSide> {
        let mut enclosing_level = u8::MAX;
        for section in policy.sections.iter().rev().filter(|s| s.line <= line) {
            if section.level >= enclosing_level {
                continue;
            }
            enclosing_level = section.level;
            if section.level <= 1 {
                break;
            }
            if find_rule_ids(&section.title).is_empty()
                && let Some(side) = RuleSide::of_heading(&section.title)
            {
                return Some(side);
            }
        }
        None
    }
    let mut sided = 0;
    for policy in starter_library() {
        let sides = policy.rule_sides();
        // Kept sorted by id (a stable sort, so duplicates keep their order).
        let mut expected: Vec<(&str, Option<RuleSide>)> = policy
            .rule_definitions
            .iter()
            .map(|definition| (definition.rule_id.as_str(), walking_back(&policy, definition.line)))
            .collect();
        expected.sort_by(|a, b| a.0.cmp(b.0));
        assert_eq!(sides.sides, expected, "{}", policy.meta.name);
        sided += expected.iter().filter(|(_, side)| side.is_some()).count();
    }
    assert!(sided > 20, "the starter library puts many rules on a side: {sided}");
}

#[test]
fn a_review_sla_is_a_time_with_its_unit() {
    let sla = |value: &str| {
        Policy::parse(&format!("---\nname: x\nreview_sla: {value}\n---\n# P\nReturn 0 or 1."))
            .map(|p| p.meta.review_sla_secs)
    };
    assert_eq!(sla("4h").unwrap(), Some(14_400));
    assert_eq!(sla("90m").unwrap(), Some(5_400));
    assert_eq!(sla(" 2d").unwrap(), Some(172_800));
    assert_eq!(Policy::parse("---\nname: x\n---\n# P\nReturn 0 or 1.").unwrap().meta.review_sla_secs, None);
    for wrong in ["4", "0h", "366d", "soon", "1.5h", "-1h", "h", "4é"] {
        let err = sla(wrong).unwrap_err();
        assert!(
            matches!(err, PolicyError::FrontMatterField { ref field, line: 3, .. } if field == "review_sla"),
            "{wrong}: {err:?}"
        );
        assert!(err.to_string().contains("90m, 4h, 2d"), "{wrong}: {err}");
    }
    // Stored before the key was read, a version with any value still parses, with the default SLA.
    let stored = Policy::parse_stored("---\nname: x\nreview_sla: 1w\n---\n# P\nReturn 0 or 1.", None).unwrap();
    assert_eq!(stored.meta.review_sla_secs, None);
}

#[test]
fn markup_that_used_to_hide_or_drop_settings_is_read_as_written() {
    // An inline code span opening a line is no fence: the headings after it still count.
    let policy = Policy::parse(
        "---\nname: x\noutput: json\n---\n# P\n```{\"violation\": 0}``` is the only answer.\n## VIOLATES (1)\n\
         - XX1.a Bad.\n## DOES NOT VIOLATE (0)\n- XX0.a Fine.\n",
    )
    .unwrap();
    assert_eq!(policy.rule_ids.iter().map(String::as_str).collect::<Vec<_>>(), ["XX0.a", "XX1.a"]);
    // A float JSON cannot hold is refused, never turned into null (the server's default).
    let nan = Policy::parse("---\nname: x\nrouting:\n  min_engine_confidence: .nan\n---\n# P\nReturn 0 or 1.\n");
    assert!(nan.unwrap_err().to_string().contains(".nan"));
    // "0/1" says the format as "0 or 1" does, and so do the other ways people write it.
    for wording in [
        "Answer with 0/1 only.",
        "Return `0` or `1`.",
        "Return 1 if the content violates the policy, otherwise return 0.",
        "Answer 0 (safe) or 1 (violating).",
        "Reply \"1\" or \"0\".",
    ] {
        let text = format!("---\nname: x\noutput: binary\n---\n# P\n{wording}\n");
        let report = lint(&text, &exact_opts());
        assert!(
            report.findings.iter().all(|f| f.code != "missing-output-format" && f.code != "parse-error"),
            "{wording}: {:#?}",
            report.findings
        );
    }
    let report = lint("---\nname: x\noutput: binary\n---\n# P\nReturn the section number.\n", &exact_opts());
    assert!(report.findings.iter().any(|f| f.code == "missing-output-format"), "{:#?}", report.findings);
}

#[test]
fn lint_names_rule_ids_the_grammar_reads_only_part_of() {
    let text = "---\nname: x\n---\n# P\nReturn 0 or 1.\n## VIOLATES (1)\n- SP1.A Bad.\n- SP2.a.i Worse.\n\
                ## DOES NOT VIOLATE (0)\n- SP0.a Fine.\n";
    let report = lint(text, &exact_opts());
    let shapes: Vec<&str> =
        report.findings.iter().filter(|f| f.code == "rule-id-shape").map(|f| f.message.as_str()).collect();
    assert_eq!(shapes.len(), 2, "{:#?}", report.findings);
    assert!(shapes[0].contains("SP1.A is read as rule SP1"), "{shapes:?}");
    let clean = lint(&text.replace("SP1.A", "SP1.a").replace("SP2.a.i", "SP2.a"), &exact_opts());
    assert!(clean.findings.iter().all(|f| f.code != "rule-id-shape"));
}

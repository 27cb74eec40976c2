//! Comparing runs, and the HTML report: well-formed, holds its plots, no external URLs, escapes content.

mod common;

use safeguard_eval::html::{escape, render_comparison_html, render_report_html};
use safeguard_eval::{FlipKind, Predicted, ScoreOptions, compare_runs, score_predictions};

#[test]
fn compare_lists_flips_and_deltas_on_common_items() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = common::load_dataset(dir.path());
    // Labels: 1, 2 violating; 5, 6 safe.
    let before = vec![
        common::prediction("1", "violation", "b1"),
        common::prediction("2", "allow", "b2"),
        common::prediction("5", "allow", "b5"),
        common::prediction("6", "allow", "b6"),
        common::prediction("7", "allow", "only before"),
    ];
    let after = vec![
        common::prediction("1", "violation", "a1"),
        common::prediction("2", "violation", "a2 fixed"),
        common::prediction("5", "violation", "a5 broke"),
        common::prediction("6", "needs_review", "a6 unsure"),
        common::prediction("8", "allow", "only after"),
    ];
    let comparison = compare_runs(&before, &after, &dataset, &ScoreOptions::default()).unwrap();
    assert_eq!(comparison.common_items, 4);
    assert_eq!(comparison.only_in_before.ids, vec!["7"]);
    assert_eq!(comparison.only_in_after.ids, vec!["8"]);
    let flips: Vec<_> = comparison.flips.iter().map(|f| (f.id.as_str(), f.before, f.after, f.kind)).collect();
    assert_eq!(
        flips,
        vec![
            ("2", Predicted::Allow, Predicted::Violation, FlipKind::Fixed),
            ("5", Predicted::Allow, Predicted::Violation, FlipKind::Broken),
            ("6", Predicted::Allow, Predicted::NeedsReview, FlipKind::Broken),
        ]
    );
    assert_eq!(comparison.flips[0].before_rationale.as_deref(), Some("b2"));
    assert_eq!(comparison.flips[0].after_rationale.as_deref(), Some("a2 fixed"));
    assert_eq!((comparison.fixed, comparison.broken, comparison.changed), (1, 2, 0));
    // Before on the 4 common items: tp=1 fn=1 tn=2 -> recall 0.5, precision 1.
    // After (needs_review positive): tp=2 fp=2 -> recall 1, precision 0.5.
    assert_eq!(comparison.before.metrics.recall, Some(0.5));
    assert_eq!(comparison.after.metrics.precision, Some(0.5));
    assert_eq!(comparison.deltas.recall, Some(0.5));
    assert_eq!(comparison.deltas.precision, Some(-0.5));
    assert_eq!(comparison.deltas.needs_review_rate, Some(0.25));
}

/// An item a person used to see that now gets a wrong answer unseen is a regression: for a violation, a miss.
#[test]
fn a_review_that_turns_into_a_wrong_answer_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = common::load_dataset(dir.path());
    let before =
        vec![common::prediction("1", "needs_review", "unsure"), common::prediction("5", "needs_review", "unsure")];
    let after = vec![common::prediction("1", "allow", "missed"), common::prediction("5", "allow", "right")];
    let comparison = compare_runs(&before, &after, &dataset, &ScoreOptions::default()).unwrap();
    let kinds: Vec<_> = comparison.flips.iter().map(|f| (f.id.as_str(), f.kind)).collect();
    assert_eq!(kinds, vec![("1", FlipKind::Broken), ("5", FlipKind::Fixed)]);
    assert_eq!((comparison.fixed, comparison.broken, comparison.changed), (1, 1, 0));
}

/// An outage in either run is no flip: a correct item the second run failed on is not a regression of the policy.
#[test]
fn an_item_a_run_failed_on_is_left_out_of_the_flips() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = common::load_dataset(dir.path());
    let before = vec![common::prediction("1", "violation", "right"), common::prediction("5", "allow", "right")];
    let mut failed = common::prediction("1", "needs_review", "");
    failed.error = Some("the backend timed out".into());
    let after = vec![failed, common::prediction("5", "violation", "broke")];
    let comparison = compare_runs(&before, &after, &dataset, &ScoreOptions::default()).unwrap();
    let kinds: Vec<_> = comparison.flips.iter().map(|f| (f.id.as_str(), f.kind)).collect();
    assert_eq!(kinds, vec![("5", FlipKind::Broken)]);
    assert_eq!((comparison.failed.count, comparison.failed.ids.clone()), (1, vec!["1".to_string()]));
    assert!(render_comparison_html("t", &comparison).contains("1 failed in a run"));
}

const VOID: [&str; 6] = ["meta", "br", "hr", "img", "input", "link"];

/// Checks that every element is closed in order; returns the tag names seen.
fn check_balanced(html: &str) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    let mut seen = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        rest = &rest[start + 1..];
        let end = rest.find('>').expect("unterminated tag");
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().unwrap_or_else(|| panic!("closing </{name}> with nothing open"));
            assert_eq!(open, name.trim(), "mismatched tags");
            continue;
        }
        let name: String = tag.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        assert!(!name.is_empty(), "bad tag <{tag}>");
        assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes in <{tag}>");
        seen.push(name.clone());
        if !tag.ends_with('/') && !VOID.contains(&name.as_str()) {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    seen
}

#[test]
fn the_report_is_well_formed_self_contained_and_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = common::load_dataset(dir.path());
    let report = score_predictions(&common::predictions(), &dataset, &ScoreOptions::default()).unwrap();
    let html = render_report_html("Policy <spam> v2", &[("saved run".to_string(), report)]);

    assert!(html.starts_with("<!DOCTYPE html>"));
    let tags = check_balanced(&html);
    assert!(tags.iter().filter(|t| *t == "svg").count() >= 4, "confusion, bars and two histograms");
    assert!(!html.contains("http"), "no external URLs or namespaces");
    assert!(!tags.iter().any(|t| t == "script" || t == "link" || t == "img" || t == "iframe"));

    // Item 5's text and the rationales are escaped, as is the title.
    assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; buy now"));
    assert!(html.contains("rationale for 3 &lt;b&gt;"));
    assert!(html.contains("<title>Policy &lt;spam&gt; v2</title>"));

    // Confusion heatmap data labels (needs_review in its own column), bars per effort, latency histogram.
    let confusion = svg_with_class(&html, "confusion");
    for label in ["TP 2", "FN 1", "FP 1", "TN 2", "review 1"] {
        assert!(confusion.contains(&format!(">{label}<")), "missing {label}");
    }
    let bars = svg_with_class(&html, "pr-bars");
    // Effort low: items 1-4 -> tp 1,2,4(review) fn 3 -> precision 1.000 recall 0.750.
    assert!(bars.contains(">low<") && bars.contains(">high<"));
    assert!(bars.contains(">1.000<") && bars.contains(">0.750<"));
    assert!(svg_with_class(&html, "latency-histogram").contains(" ms<"));
}

fn svg_with_class<'a>(html: &'a str, class: &str) -> &'a str {
    let start = html.find(&format!("<svg class=\"{class}\"")).unwrap_or_else(|| panic!("no svg {class}"));
    let end = html[start..].find("</svg>").unwrap() + start;
    &html[start..end]
}

#[test]
fn the_comparison_report_shows_flips_with_both_rationales() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = common::load_dataset(dir.path());
    let before = vec![common::prediction("5", "allow", "fine"), common::prediction("1", "violation", "x")];
    let after = vec![
        common::prediction("5", "violation", "now <img src=x onerror=alert(1)>"),
        common::prediction("1", "violation", "x"),
    ];
    let comparison = compare_runs(&before, &after, &dataset, &ScoreOptions::default()).unwrap();
    let html = render_comparison_html("v1 vs v2", &comparison);
    check_balanced(&html);
    assert!(!html.contains("http"));
    assert!(html.contains("<table class=\"flips\">"));
    assert!(html.contains("&lt;script&gt;"), "flipped item text is escaped");
    assert!(html.contains("now &lt;img src=x onerror=alert(1)&gt;"));
    assert!(html.contains("<tr class=\"broken\">"));
    assert_eq!(escape("a&b\"'"), "a&amp;b&quot;&#39;");
}

//! A self-contained HTML report: inline CSS and SVG, no scripts, no external assets, readable offline.
//!
//! Every piece of text that comes from data (item text, rationales, ids, names) goes through [`escape`].

use std::fmt::Write;

use crate::compare::{Comparison, FlipKind};
use crate::metrics::{HistogramBin, Metrics};
use crate::score::{Example, ScoreReport};

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn score(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.3}"))
}

fn signed(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:+.3}"))
}

fn label_text(label: Option<bool>) -> &'static str {
    match label {
        Some(true) => "violating",
        Some(false) => "safe",
        None => "unknown",
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:72em}\
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:0.25em 0.6em;\
text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.excerpt{max-width:32em;white-space:pre-wrap;word-break:break-word}.broken{background:#fde8e8}\
.fixed{background:#e6f4ea}svg{display:block;margin:0.5em 0 1.5em}svg text{font-size:12px}\
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ddd}h3{font-size:1.05em}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n{body}</body>\n</html>\n",
        escape(title),
        escape(title)
    )
}

/// A report for one or more runs of the same dataset (e.g. one per effort).
pub fn render_report_html(title: &str, runs: &[(String, ScoreReport)]) -> String {
    let mut body = String::new();
    let bars: Vec<(String, Option<f64>, Option<f64>)> = match runs {
        [(_, only)] => only
            .by_effort
            .iter()
            .map(|(effort, stats)| (effort.clone(), stats.metrics.precision, stats.metrics.recall))
            .collect(),
        _ => runs.iter().map(|(name, r)| (name.clone(), r.metrics.precision, r.metrics.recall)).collect(),
    };
    body.push_str("<h2>Precision and recall by effort</h2>\n");
    body.push_str(&precision_recall_bars(&bars));
    for (name, report) in runs {
        let _ = writeln!(body, "<h2>Run: {}</h2>", escape(name));
        body.push_str(&run_section(report));
    }
    page(title, &body)
}

/// A report comparing two runs: deltas, both confusion matrices, and every flipped item.
pub fn render_comparison_html(title: &str, comparison: &Comparison) -> String {
    let mut body = String::new();
    let d = &comparison.deltas;
    let _ = writeln!(
        body,
        "<p>{} items in both runs; {} flipped: {} fixed, {} broken, {} changed. {} only before, {} only after. {} \
         failed in a run (left out of the flips).</p>",
        comparison.common_items,
        comparison.flips.len(),
        comparison.fixed,
        comparison.broken,
        comparison.changed,
        comparison.only_in_before.count,
        comparison.only_in_after.count,
        comparison.failed.count
    );
    body.push_str("<h2>Deltas (after − before)</h2>\n<table>\n<tr><th>metric</th><th>before</th><th>after</th><th>delta</th></tr>\n");
    let (b, a) = (&comparison.before, &comparison.after);
    let rows = [
        ("precision", b.metrics.precision, a.metrics.precision, d.precision),
        ("recall", b.metrics.recall, a.metrics.recall, d.recall),
        ("F1", b.metrics.f1, a.metrics.f1, d.f1),
        ("accuracy", b.metrics.accuracy, a.metrics.accuracy, d.accuracy),
        ("false positive rate", b.metrics.false_positive_rate, a.metrics.false_positive_rate, d.false_positive_rate),
        ("needs_review rate", b.needs_review.rate, a.needs_review.rate, d.needs_review_rate),
        ("parse failure rate", b.parse_failure_rate, a.parse_failure_rate, d.parse_failure_rate),
    ];
    for (name, before, after, delta) in rows {
        let _ = writeln!(
            body,
            "<tr><td>{name}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            score(before),
            score(after),
            signed(delta)
        );
    }
    let _ = writeln!(
        body,
        "<tr><td>latency p50 (ms)</td><td colspan=\"2\"></td><td class=\"num\">{}</td></tr>\n\
         <tr><td>latency p95 (ms)</td><td colspan=\"2\"></td><td class=\"num\">{}</td></tr>\n\
         <tr><td>completion tokens (mean)</td><td colspan=\"2\"></td><td class=\"num\">{}</td></tr>\n</table>",
        signed(d.latency_p50_ms),
        signed(d.latency_p95_ms),
        signed(d.completion_tokens_mean)
    );
    body.push_str("<h2>Precision and recall, before and after</h2>\n");
    body.push_str(&precision_recall_bars(&[
        ("before".to_string(), b.metrics.precision, b.metrics.recall),
        ("after".to_string(), a.metrics.precision, a.metrics.recall),
    ]));
    body.push_str("<h2>Flipped items</h2>\n");
    if comparison.flips.is_empty() {
        body.push_str("<p>No item changed its prediction.</p>\n");
    } else {
        body.push_str(
            "<table class=\"flips\">\n<tr><th>id</th><th>text</th><th>label</th><th>before</th><th>after</th>\
             <th>kind</th><th>before rationale</th><th>after rationale</th></tr>\n",
        );
        for flip in &comparison.flips {
            let class = match flip.kind {
                FlipKind::Fixed => "fixed",
                FlipKind::Broken => "broken",
                FlipKind::Changed => "changed",
            };
            let _ = writeln!(
                body,
                "<tr class=\"{class}\"><td>{}</td><td class=\"excerpt\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{class}</td><td class=\"excerpt\">{}</td><td class=\"excerpt\">{}</td></tr>",
                escape(&flip.id),
                escape(&flip.text),
                label_text(flip.label),
                flip.before.as_str(),
                flip.after.as_str(),
                escape(flip.before_rationale.as_deref().unwrap_or("")),
                escape(flip.after_rationale.as_deref().unwrap_or(""))
            );
        }
        body.push_str("</table>\n");
    }
    body.push_str("<h2>Before</h2>\n");
    body.push_str(&run_section(b));
    body.push_str("<h2>After</h2>\n");
    body.push_str(&run_section(a));
    page(title, &body)
}

fn run_section(report: &ScoreReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<p>Dataset <b>{}</b>{}: {} dataset items, {} prediction records, {} joined, {} unlabelled; \
         {} missing predictions, {} predictions not in the dataset, {} duplicates.</p>",
        escape(&report.dataset),
        report.policy.as_ref().map(|p| format!(", policy <b>{}</b>", escape(p))).unwrap_or_default(),
        report.dataset_items,
        report.prediction_records,
        report.joined,
        report.unlabelled,
        report.missing_predictions.count,
        report.unknown_predictions.count,
        report.duplicate_predictions.count
    );
    out.push_str(
        "<h3>Scores</h3>\n<table>\n<tr><th>view</th><th>n</th><th>TP</th><th>FP</th><th>TN</th><th>FN</th>\
                  <th>precision</th><th>recall</th><th>F1</th><th>accuracy</th><th>FPR</th></tr>\n",
    );
    out.push_str(&metrics_row("needs_review as positive", &report.metrics));
    out.push_str(&metrics_row("needs_review excluded", &report.excluding_needs_review));
    out.push_str("</table>\n");
    let _ = writeln!(
        out,
        "<p>needs_review: {} (rate {}; {} truly violating, {} truly safe). Parse failures: {} (rate {}). \
         Classification errors: {}.</p>",
        report.needs_review.count,
        score(report.needs_review.rate),
        report.needs_review.positives,
        report.needs_review.negatives,
        report.parse_failures,
        score(report.parse_failure_rate),
        report.errors
    );
    out.push_str("<h3>Confusion matrix</h3>\n");
    out.push_str(&confusion_heatmap(report));
    if let Some(multi) = &report.multi_policy {
        let _ = writeln!(
            out,
            "<h3>Multi-policy accuracy</h3>\n<p>{} of {} items right on every policy: accuracy {} ({} items left out for unknown labels).</p>",
            multi.correct,
            multi.items,
            score(multi.accuracy),
            multi.excluded
        );
        out.push_str(&metrics_table("policy", multi.per_policy.iter()));
    }
    if !report.per_category.is_empty() {
        out.push_str("<h3>Per category</h3>\n");
        out.push_str(&metrics_table("category", report.per_category.iter()));
    }
    if !report.per_group.is_empty() {
        out.push_str("<h3>Per group</h3>\n");
        out.push_str(&metrics_table("group", report.per_group.iter()));
    }
    out.push_str(
        "<h3>Latency and tokens by effort</h3>\n<table>\n<tr><th>effort</th><th>items</th>\
                  <th>latency mean / p50 / p95 (ms)</th><th>prompt tokens mean</th><th>cached mean</th>\
                  <th>completion tokens mean / p50 / p95</th></tr>\n",
    );
    for (effort, stats) in &report.by_effort {
        let triple = |d: Option<crate::metrics::Distribution>| {
            d.map_or_else(|| "n/a".to_string(), |d| format!("{:.1} / {:.1} / {:.1}", d.mean, d.p50, d.p95))
        };
        let mean =
            |d: Option<crate::metrics::Distribution>| d.map_or_else(|| "n/a".to_string(), |d| format!("{:.1}", d.mean));
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(effort),
            stats.items,
            triple(stats.latency_ms),
            mean(stats.prompt_tokens),
            mean(stats.cached_prompt_tokens),
            triple(stats.completion_tokens)
        );
    }
    out.push_str("</table>\n");
    for (effort, stats) in &report.by_effort {
        if !stats.latency_histogram.is_empty() {
            let _ = writeln!(out, "<h3>Latency histogram ({})</h3>", escape(effort));
            out.push_str(&latency_histogram(&stats.latency_histogram));
        }
    }
    for (title, examples) in [
        ("False positives", &report.false_positives),
        ("False negatives", &report.false_negatives),
        ("Needs review", &report.needs_review_items),
    ] {
        if !examples.is_empty() {
            let _ = writeln!(out, "<h3>{title} (first {})</h3>", examples.len());
            out.push_str(&examples_table(examples));
        }
    }
    out
}

fn metrics_row(name: &str, m: &Metrics) -> String {
    format!(
        "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
         <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
         <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>\n",
        escape(name),
        m.n,
        m.confusion.tp,
        m.confusion.fp,
        m.confusion.tn,
        m.confusion.fn_,
        score(m.precision),
        score(m.recall),
        score(m.f1),
        score(m.accuracy),
        score(m.false_positive_rate)
    )
}

fn metrics_table<'a>(heading: &str, rows: impl Iterator<Item = (&'a String, &'a Metrics)>) -> String {
    let mut out = format!(
        "<table>\n<tr><th>{heading}</th><th>n</th><th>TP</th><th>FP</th><th>TN</th><th>FN</th><th>precision</th>\
         <th>recall</th><th>F1</th><th>accuracy</th><th>FPR</th></tr>\n"
    );
    for (name, metrics) in rows {
        out.push_str(&metrics_row(name, metrics));
    }
    out.push_str("</table>\n");
    out
}

fn examples_table(examples: &[Example]) -> String {
    let mut out = String::from(
        "<table class=\"examples\">\n<tr><th>id</th><th>text</th><th>label</th><th>predicted</th><th>rationale</th></tr>\n",
    );
    for example in examples {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"excerpt\">{}</td><td>{}</td><td>{}</td><td class=\"excerpt\">{}</td></tr>",
            escape(&example.id),
            escape(&example.text),
            label_text(example.label),
            example.predicted.as_str(),
            escape(example.rationale.as_deref().unwrap_or(""))
        );
    }
    out.push_str("</table>\n");
    out
}

/// Rows: the true label. Columns: the prediction, with needs_review in its own column.
fn confusion_heatmap(report: &ScoreReport) -> String {
    let c = report.excluding_needs_review.confusion;
    let review = &report.needs_review;
    let cells = [
        [("TP", c.tp, true), ("FN", c.fn_, false), ("review", review.positives, false)],
        [("FP", c.fp, false), ("TN", c.tn, true), ("review", review.negatives, false)],
    ];
    let max = cells.iter().flatten().map(|cell| cell.1).max().unwrap_or(0).max(1);
    let (left, top, cell_w, cell_h) = (130, 40, 110, 60);
    let mut svg = format!(
        "<svg class=\"confusion\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"confusion matrix\">\n",
        left + 3 * cell_w + 10,
        top + 2 * cell_h + 10,
        left + 3 * cell_w + 10,
        top + 2 * cell_h + 10
    );
    for (col, name) in ["predicted violation", "predicted allow", "needs review"].iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{name}</text>",
            left + col * cell_w + cell_w / 2,
            top - 12
        );
    }
    for (row, name) in ["actual violating", "actual safe"].iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{name}</text>",
            left - 8,
            top + row * cell_h + cell_h / 2 + 4
        );
        for (col, (label, count, correct)) in cells[row].iter().enumerate() {
            let strength = 0.08 + 0.82 * (*count as f64 / max as f64);
            let color = match (col, correct) {
                (2, _) => "200,140,0",
                (_, true) => "30,100,200",
                (_, false) => "200,40,40",
            };
            let (x, y) = (left + col * cell_w, top + row * cell_h);
            let _ = writeln!(
                svg,
                "<rect x=\"{x}\" y=\"{y}\" width=\"{cell_w}\" height=\"{cell_h}\" fill=\"rgba({color},{strength:.2})\" stroke=\"#fff\"/>\n\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{label} {count}</text>",
                x + cell_w / 2,
                y + cell_h / 2 + 4
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// Two bars per group: precision and recall, each with its value written above it.
fn precision_recall_bars(groups: &[(String, Option<f64>, Option<f64>)]) -> String {
    let (left, top, plot_h, bar_w, gap) = (40.0, 20.0, 160.0, 38.0, 30.0);
    let width = left + groups.len() as f64 * (2.0 * bar_w + gap) + gap + 120.0;
    let height = top + plot_h + 40.0;
    let mut svg = format!(
        "<svg class=\"pr-bars\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" role=\"img\" aria-label=\"precision and recall by effort\">\n"
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">1.0</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>",
        top + plot_h,
        width - 120.0,
        top + plot_h,
        left - 4.0,
        top + 4.0,
        left - 4.0,
        top + plot_h
    );
    for (index, (name, precision, recall)) in groups.iter().enumerate() {
        let x0 = left + gap + index as f64 * (2.0 * bar_w + gap);
        for (offset, (metric, value, color)) in
            [("precision", precision, "#1e64c8"), ("recall", recall, "#e07b00")].iter().enumerate()
        {
            let x = x0 + offset as f64 * bar_w;
            let bar_h = value.unwrap_or(0.0).clamp(0.0, 1.0) * plot_h;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bar_h:.1}\" fill=\"{color}\"><title>{} {metric} {}</title></rect>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                top + plot_h - bar_h,
                bar_w - 2.0,
                escape(name),
                score(**value),
                x + bar_w / 2.0,
                top + plot_h - bar_h - 4.0,
                score(**value)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x0 + bar_w,
            top + plot_h + 16.0,
            escape(name)
        );
    }
    let legend_x = width - 110.0;
    let _ = writeln!(
        svg,
        "<rect x=\"{legend_x}\" y=\"{top}\" width=\"12\" height=\"12\" fill=\"#1e64c8\"/><text x=\"{}\" y=\"{}\">precision</text>\n\
         <rect x=\"{legend_x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"#e07b00\"/><text x=\"{}\" y=\"{}\">recall</text>",
        legend_x + 16.0,
        top + 10.0,
        top + 18.0,
        legend_x + 16.0,
        top + 28.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn latency_histogram(bins: &[HistogramBin]) -> String {
    let (left, top, plot_h, bar_w) = (40.0, 20.0, 120.0, 36.0);
    let width = left + bins.len() as f64 * bar_w + 20.0;
    let height = top + plot_h + 40.0;
    let max = bins.iter().map(|b| b.count).max().unwrap_or(0).max(1) as f64;
    let mut svg = format!(
        "<svg class=\"latency-histogram\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" role=\"img\" aria-label=\"latency histogram\">\n"
    );
    for (index, bin) in bins.iter().enumerate() {
        let x = left + index as f64 * bar_w;
        let bar_h = bin.count as f64 / max * plot_h;
        let _ = writeln!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bar_h:.1}\" fill=\"#5a8f5a\"><title>{:.1}–{:.1} ms: {}</title></rect>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            top + plot_h - bar_h,
            bar_w - 2.0,
            bin.lo,
            bin.hi,
            bin.count,
            x + bar_w / 2.0,
            top + plot_h - bar_h - 4.0,
            bin.count
        );
    }
    if let (Some(first), Some(last)) = (bins.first(), bins.last()) {
        let _ = writeln!(
            svg,
            "<text x=\"{left}\" y=\"{:.1}\">{:.0} ms</text>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.0} ms</text>",
            top + plot_h + 16.0,
            first.lo,
            left + bins.len() as f64 * bar_w,
            top + plot_h + 16.0,
            last.hi
        );
    }
    svg.push_str("</svg>\n");
    svg
}

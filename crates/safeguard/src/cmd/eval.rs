//! `safeguard eval`: score saved classify output, compare two runs, or run policies live on a dataset.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use safeguard_eval::html::{render_comparison_html, render_report_html};
use safeguard_eval::score::ScoreReport;
use safeguard_eval::{
    Comparison, Dataset, DatasetSpec, FieldMapping, Metrics, PredictionRecord, Predictions, ScoreOptions, compare_runs,
    excerpt, read_predictions, score_predictions,
};
use safeguard_policy::Policy;

use super::classify::load_policies;
use super::output_file::OutputFile;
use super::{EXIT_FAILURE, EXIT_FINDINGS};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
#[command(after_help = "Modes:\n  \
    score saved output:  safeguard eval --predictions run.jsonl --dataset xstest\n  \
    compare two runs:    safeguard eval --compare v1.jsonl v2.jsonl --dataset data.jsonl\n  \
    run live:            safeguard eval --policy spam.md --model model.gguf --dataset toxicchat:toxicity --effort low,high\n\n\
    Named datasets: openai-moderation:<S|H|V|HR|SH|S3|H2|V2|any>, toxicchat:<toxicity|jailbreaking>[:test|train],\n  \
    xstest, davidson:<hate|offensive|any>; anything else is a JSONL or CSV file.")]
pub struct Args {
    /// Saved `safeguard classify` output (JSONL) to score against the dataset.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["compare", "model"])]
    predictions: Option<PathBuf>,
    /// Two saved runs on the same items: prints metric deltas and every flipped item.
    #[arg(long, num_args = 2, value_names = ["BEFORE", "AFTER"], conflicts_with = "model")]
    compare: Option<Vec<PathBuf>>,
    /// A JSONL/CSV file or a named shared dataset (see below).
    #[arg(long, value_name = "SPEC")]
    dataset: String,
    /// Folder holding the shared datasets [default: shared/data or ../shared/data]
    #[arg(long, env = "SAFEGUARD_DATASETS_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    fields: DatasetFields,
    /// Break scores down by this field.
    #[arg(long, value_name = "NAME")]
    group_field: Option<String>,
    /// Another label field, scored as its own category (repeatable).
    #[arg(long = "category-field", value_name = "NAME")]
    category_fields: Vec<String>,
    /// Also count rows of an export labelled under other versions of a policy (their `policy_hash` differs from
    /// the policy file's). By default a live run leaves them out: a label given under an older wording may be
    /// wrong under this one. Scoring saved output names no policy file, so every row counts there.
    #[arg(long)]
    any_policy_version: bool,
    /// Scoring saved runs: the policy NAME whose verdict is scored [default: the overall outcome].
    /// Running live: a policy FILE (repeatable).
    #[arg(long, value_name = "NAME|FILE")]
    policy: Vec<String>,
    /// Score policy POLICY against dataset category CATEGORY for multi-policy accuracy (repeatable).
    #[arg(long = "map", value_name = "POLICY=CATEGORY")]
    policy_labels: Vec<String>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Also write a self-contained HTML report here.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Exit with code 2 when F1 (needs_review counted as positive) is below this: a CI gate.
    #[arg(long, value_name = "F1", value_parser = share)]
    min_f1: Option<f64>,
    /// With --min-f1: the largest share of answers the model gave that could not be read (cut off, no final
    /// message, unparseable) for the gate to pass. Each such item counts as a positive, so a run that read none
    /// could still clear an F1 bar on a dataset that is mostly violations.
    #[arg(long, value_name = "SHARE", default_value_t = 0.05, value_parser = share)]
    max_parse_failures: f64,
    /// With --compare: exit with code 2 when any item went from right to wrong.
    #[arg(long)]
    fail_on_regression: bool,

    /// Run live with this model (GGUF).
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Reasoning efforts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "medium")]
    effort: Vec<String>,
    /// Only the first N dataset items.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Resumable result cache (JSONL): rerunning continues where an interrupted run stopped.
    #[arg(long, value_name = "FILE")]
    cache: Option<PathBuf>,
    /// Items classified at the same time.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Write the live predictions as JSONL (one file per effort when there are several: NAME.EFFORT.jsonl).
    #[arg(long, value_name = "FILE")]
    save_predictions: Option<PathBuf>,
    /// Completion-token cap per prompt [default: the budget for the effort].
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    #[command(flatten)]
    engine: super::classify::EngineFlags,
}

/// How a dataset file's fields are read: `eval`'s and `policy backtest --dataset`'s. Named shared datasets know
/// their own.
#[derive(clap::Args)]
pub(super) struct DatasetFields {
    /// Field holding the text [default: text, prompt or content].
    #[arg(long, value_name = "NAME")]
    text_field: Option<String>,
    /// Field holding the label [default: violates or label]; dotted names reach into objects (labels.S).
    #[arg(long, value_name = "NAME")]
    label_field: Option<String>,
    /// Field holding the id that predictions are joined on.
    #[arg(long, value_name = "NAME", default_value = "id")]
    id_field: String,
    /// The label value that means "violating" (case-insensitive); without it labels are 0/1, true/false or yes/no.
    /// Other values mean safe: those listed by --negative-label, or, without that flag, every other value, each
    /// such value then listed on stderr and under `read_as_negative` in the JSON report, so a typo shows.
    #[arg(long, value_name = "VALUE")]
    positive_label: Option<String>,
    /// A label value that means "safe" (repeatable or comma-separated; needs --positive-label). Given, any value
    /// that is neither the positive label nor one of these is an error naming its file and line: use it whenever
    /// the values are known, so a mistyped label cannot pass as safe.
    #[arg(long = "negative-label", value_name = "VALUE", value_delimiter = ',', requires = "positive_label")]
    negative_labels: Vec<String>,
}

impl DatasetFields {
    pub(super) fn mapping(&self) -> FieldMapping {
        FieldMapping {
            text_field: self.text_field.clone(),
            label_field: self.label_field.clone(),
            id_field: Some(self.id_field.clone()),
            positive_label: self.positive_label.clone(),
            negative_labels: self.negative_labels.clone(),
            ..FieldMapping::default()
        }
    }

    /// Says which label values were read as safe only because they are not the positive label, so a typo shows.
    pub(super) fn report_read_as_negative(&self, dataset: &Dataset) {
        for (field, values) in &dataset.read_as_negative {
            let values: Vec<String> = values.iter().map(|(value, rows)| format!("`{value}` ({rows} row(s))")).collect();
            eprintln!(
                "field `{field}`: read as safe because not --positive-label `{}`: {}; name the safe values with \
                 --negative-label to make any other value an error",
                self.positive_label.as_deref().unwrap_or_default(),
                values.join(", ")
            );
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Checked first in every mode: a report written over the dataset or a run it reads would destroy it.
    if let Some(path) = &args.html {
        refuse_input_path(path, &args)?;
        check_parent_exists(path)?;
    }
    // A live run names policy files: loaded once, for the versions whose labels count and to run them.
    let policies = match args.model {
        Some(_) => load_policies(&args.policy.iter().map(PathBuf::from).collect::<Vec<_>>())?,
        None => Vec::new(),
    };
    let dataset = load_dataset(&args, &policies)?;
    let options = score_options(&args)?;
    if let Some(path) = &args.predictions {
        let predictions = read_predictions(path)?;
        let mut report = score_predictions(&predictions.records, &dataset, &options)?;
        report.add_unjoinable(&predictions.unjoinable, options.max_listed_ids);
        let unjudged = unjudged(&report);
        let code = emit_report(&args, &[(path.display().to_string(), report)])?;
        if let Some(why) = unjudged {
            eprintln!("{why}");
            if code == ExitCode::SUCCESS {
                // The report is complete, but not every item was judged: as a live run that failed some, the run
                // did not fully work, and a gate must not pass on it.
                return Ok(ExitCode::from(EXIT_FAILURE));
            }
        }
        Ok(code)
    } else if let Some(paths) = &args.compare {
        let [before_path, after_path] = paths.as_slice() else {
            bail!("--compare takes two files: BEFORE AFTER");
        };
        let before = read_predictions(before_path)?;
        let after = read_predictions(after_path)?;
        let mut comparison = compare_runs(&before.records, &after.records, &dataset, &options)?;
        comparison.before.add_unjoinable(&before.unjoinable, options.max_listed_ids);
        comparison.after.add_unjoinable(&after.unjoinable, options.max_listed_ids);
        // The comparison covers the items both runs judged; each run must still have judged every item, or a
        // gate on the shared part passes on a run that failed the rest.
        let mut unjudged_runs = Vec::new();
        for (path, run) in [(before_path, &before), (after_path, &after)] {
            if let Some(why) = unjudged_run(run, &dataset, &options)? {
                unjudged_runs.push(format!("{}: {why}", path.display()));
            }
        }
        let code = emit_comparison(&args, before_path, after_path, &comparison)?;
        // Said whatever the gate found: a regression exit must not hide that a run failed items.
        for why in &unjudged_runs {
            eprintln!("{why}");
        }
        if !unjudged_runs.is_empty() && code == ExitCode::SUCCESS {
            return Ok(ExitCode::from(EXIT_FAILURE));
        }
        Ok(code)
    } else if args.model.is_some() {
        live::run(&args, dataset, options, policies)
    } else {
        bail!("say what to evaluate: --predictions FILE, --compare BEFORE AFTER, or --policy FILE --model PATH")
    }
}

/// The folder of the shared datasets: the one asked for, or `shared/data` beside or above the working directory.
pub(super) fn shared_data_dir(asked: Option<&Path>) -> PathBuf {
    if let Some(dir) = asked {
        return dir.to_path_buf();
    }
    ["shared/data", "../shared/data"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("shared/data"))
}

/// Why a report shows a run that did not judge every item (a failed classification, a line without an item id, an
/// item with no prediction), or `None` when it judged them all.
///
/// A record with no verdict for `--policy` counts too: it is scored as `needs_review`, a positive, so a run that
/// never judged the policy could pass `--min-f1` on the items labelled violating.
fn unjudged(report: &ScoreReport) -> Option<String> {
    let (errors, missing, unjoinable) = (report.errors, report.missing_predictions.count, &report.unjoinable);
    let without_policy = report.policy_missing.count;
    if errors == 0 && missing == 0 && unjoinable.count == 0 && without_policy == 0 {
        return None;
    }
    let mut why = format!("{errors} classification(s) failed and {missing} item(s) have no prediction");
    if without_policy > 0 {
        why.push_str(&format!("; {without_policy} prediction(s) have no verdict for the policy"));
    }
    if unjoinable.count > 0 {
        why.push_str(&format!("; {} prediction line(s) name no item: {}", unjoinable.count, unjoinable.ids.join("; ")));
    }
    Some(why)
}

/// [`unjudged`] for one whole run of a comparison (the comparison itself scores only the items both runs have).
fn unjudged_run(run: &Predictions, dataset: &Dataset, options: &ScoreOptions) -> anyhow::Result<Option<String>> {
    let mut report = score_predictions(&run.records, dataset, options)?;
    report.add_unjoinable(&run.unjoinable, options.max_listed_ids);
    Ok(unjudged(&report))
}

/// Loads the dataset; with policy files (a live run), an export's rows labelled under other versions of them are
/// left out unless `--any-policy-version`.
fn load_dataset(args: &Args, policies: &[Policy]) -> anyhow::Result<Dataset> {
    let spec: DatasetSpec = args.dataset.parse()?;
    let policy_versions = match args.any_policy_version {
        true => BTreeMap::new(),
        false => policies.iter().map(|p| (p.meta.name.clone(), p.hash.to_string())).collect(),
    };
    let mapping = FieldMapping {
        group_field: args.group_field.clone(),
        category_fields: args.category_fields.clone(),
        policy_versions,
        ..args.fields.mapping()
    };
    let mut dataset = spec
        .load(&shared_data_dir(args.data_dir.as_deref()), &mapping)
        .with_context(|| format!("loading dataset {}", args.dataset))?;
    for (policy, rows) in &dataset.other_version_rows {
        let version = mapping.policy_versions.get(policy).map(String::as_str).unwrap_or_default();
        eprintln!(
            "left out {rows} row(s) of policy `{policy}` labelled under other versions than {version} \
             (--any-policy-version counts them)"
        );
    }
    if dataset.labelled_per_policy && !args.policy.is_empty() {
        // Policies scored against an export that labels several: only their labels count.
        let names: Vec<&str> = match policies {
            [] => args.policy.iter().map(String::as_str).collect(),
            loaded => loaded.iter().map(|policy| policy.meta.name.as_str()).collect(),
        };
        dataset.focus_on_policies(&names)?;
    }
    if let Some(limit) = args.limit {
        dataset.truncate(limit);
    }
    args.fields.report_read_as_negative(&dataset);
    if args.model.is_none()
        && let Some(first) = dataset.text_errors.values().next()
    {
        // Scored from saved output, such a row is judged by whatever that run made of it (classify refuses it).
        eprintln!("{} row(s) have no text to judge; the first: {first}", dataset.text_errors.len());
    }
    if !dataset.items.iter().any(|item| item.label.is_some() || !item.categories.is_empty()) {
        // Zero items scored is not a passing score: every metric would be empty and the exit status 0.
        match dataset.items.len() {
            0 => bail!("nothing to score: dataset {} holds no items", dataset.name),
            n => bail!("nothing to score: none of the {n} items of dataset {} has a known label", dataset.name),
        }
    }
    Ok(dataset)
}

fn score_options(args: &Args) -> anyhow::Result<ScoreOptions> {
    let mut policy_labels = BTreeMap::new();
    for pair in &args.policy_labels {
        let Some((policy, category)) = pair.split_once('=') else {
            bail!("--map wants POLICY=CATEGORY, got `{pair}`");
        };
        policy_labels.insert(policy.trim().to_string(), category.trim().to_string());
    }
    let policy = if args.model.is_some() {
        // Live runs name policy files; verdicts are scored by the overall outcome unless there is one policy.
        None
    } else {
        match args.policy.as_slice() {
            [] => None,
            [name] => Some(name.clone()),
            _ => bail!("when scoring saved output, --policy names the one policy to score; use --map for the others"),
        }
    };
    Ok(ScoreOptions { policy, policy_labels, ..ScoreOptions::default() })
}

fn write_html(path: &Path, html: &str) -> anyhow::Result<()> {
    OutputFile::write_whole(path, html.as_bytes())?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// A share within 0..1 (not NaN, which every comparison would pass).
fn share(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&value) { Ok(value) } else { Err(format!("{text} is not within 0..1")) }
}

fn gate(args: &Args, reports: &[(String, ScoreReport)]) -> ExitCode {
    let Some(min_f1) = args.min_f1 else {
        return ExitCode::SUCCESS;
    };
    let mut failed = false;
    for (name, report) in reports {
        if report.metrics.f1.unwrap_or(0.0) < min_f1 {
            eprintln!("F1 {} of {name} is below --min-f1 {min_f1}", fmt_score(report.metrics.f1));
            failed = true;
        }
        if let Some(rate) = report.parse_failure_rate.filter(|&rate| rate > args.max_parse_failures) {
            eprintln!(
                "{} of {name}'s answers could not be read ({}), more than --max-parse-failures {}: its F1 does not \
                 measure the policy",
                report.parse_failures,
                fmt_rate(Some(rate)),
                args.max_parse_failures
            );
            failed = true;
        }
    }
    if failed { ExitCode::from(EXIT_FINDINGS) } else { ExitCode::SUCCESS }
}

fn emit_report(args: &Args, reports: &[(String, ScoreReport)]) -> anyhow::Result<ExitCode> {
    match (args.format, reports) {
        (Format::Json, [(_, only)]) => println!("{}", serde_json::to_string_pretty(only)?),
        (Format::Json, _) => {
            let runs: BTreeMap<&str, &ScoreReport> = reports.iter().map(|(n, r)| (n.as_str(), r)).collect();
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "runs": runs }))?);
        }
        (Format::Text, _) => {
            for (name, report) in reports {
                print!("{}", text_report(name, report));
            }
        }
    }
    if let Some(path) = &args.html {
        write_html(path, &render_report_html(&format!("safeguard eval: {}", args.dataset), reports))?;
    }
    Ok(gate(args, reports))
}

fn emit_comparison(args: &Args, before: &Path, after: &Path, comparison: &Comparison) -> anyhow::Result<ExitCode> {
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(comparison)?),
        Format::Text => print!("{}", text_comparison(before, after, comparison)),
    }
    if let Some(path) = &args.html {
        let title = format!("safeguard eval: {} vs {} on {}", before.display(), after.display(), args.dataset);
        write_html(path, &render_comparison_html(&title, comparison))?;
    }
    let gate = gate(args, &[(after.display().to_string(), comparison.after.clone())]);
    if args.fail_on_regression && comparison.broken > 0 {
        eprintln!("{} items went from right to wrong", comparison.broken);
        return Ok(ExitCode::from(EXIT_FINDINGS));
    }
    Ok(gate)
}

fn fmt_score(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.3}"))
}

fn fmt_rate(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{:.1}%", v * 100.0))
}

fn metrics_line(name: &str, m: &Metrics) -> String {
    format!(
        "  {name:<22}{:>6}{:>6}{:>6}{:>6}{:>6}{:>10}{:>8}{:>8}{:>9}\n",
        m.n,
        m.confusion.tp,
        m.confusion.fp,
        m.confusion.tn,
        m.confusion.fn_,
        fmt_score(m.precision),
        fmt_score(m.recall),
        fmt_score(m.f1),
        fmt_score(m.accuracy)
    )
}

const METRICS_HEADER: &str =
    "                             n    TP    FP    TN    FN precision  recall      F1 accuracy\n";

fn text_report(name: &str, r: &ScoreReport) -> String {
    let mut out = format!(
        "{name}\ndataset {}{}: {} items, {} predictions, {} joined, {} unlabelled \
         ({} missing predictions, {} not in dataset, {} duplicates)\n",
        r.dataset,
        r.policy.as_ref().map(|p| format!(", policy {p}")).unwrap_or_default(),
        r.dataset_items,
        r.prediction_records,
        r.joined,
        r.unlabelled,
        r.missing_predictions.count,
        r.unknown_predictions.count,
        r.duplicate_predictions.count
    );
    if r.unjoinable.count > 0 {
        out.push_str(&format!(
            "{} prediction line(s) name no item (failures): {}\n",
            r.unjoinable.count,
            r.unjoinable.ids.join("; ")
        ));
    }
    out.push_str(METRICS_HEADER);
    out.push_str(&metrics_line("review as positive", &r.metrics));
    out.push_str(&metrics_line("review excluded", &r.excluding_needs_review));
    out.push_str(&format!(
        "needs_review {} ({}; {} violating, {} safe) · parse failures {} ({}) · errors {}\n",
        r.needs_review.count,
        fmt_rate(r.needs_review.rate),
        r.needs_review.positives,
        r.needs_review.negatives,
        r.parse_failures,
        fmt_rate(r.parse_failure_rate),
        r.errors
    ));
    if r.policy_missing.count > 0 {
        out.push_str(&format!(
            "{} items had no verdict for the policy (counted as needs_review)\n",
            r.policy_missing.count
        ));
    }
    if let Some(multi) = &r.multi_policy {
        out.push_str(&format!(
            "multi-policy accuracy {} ({} of {} right on every policy; {} left out for unknown labels)\n",
            fmt_score(multi.accuracy),
            multi.correct,
            multi.items,
            multi.excluded
        ));
        out.push_str(METRICS_HEADER);
        for (policy, m) in &multi.per_policy {
            out.push_str(&metrics_line(&format!("{policy} ({})", multi.policies[policy]), m));
        }
    }
    for (title, table) in [("per category", &r.per_category), ("per group", &r.per_group)] {
        if !table.is_empty() {
            out.push_str(&format!("{title}:\n{METRICS_HEADER}"));
            for (key, m) in table {
                out.push_str(&metrics_line(key, m));
            }
        }
    }
    for (effort, stats) in &r.by_effort {
        let triple = |d: Option<safeguard_eval::Distribution>| {
            d.map_or_else(|| "n/a".into(), |d| format!("{:.0}/{:.0}/{:.0}", d.mean, d.p50, d.p95))
        };
        out.push_str(&format!(
            "effort {effort}: {} items · F1 {} · latency ms mean/p50/p95 {} · completion tokens {} · prompt tokens {}\n",
            stats.items,
            fmt_score(stats.metrics.f1),
            triple(stats.latency_ms),
            triple(stats.completion_tokens),
            triple(stats.prompt_tokens)
        ));
    }
    out.push('\n');
    out
}

fn text_comparison(before: &Path, after: &Path, c: &Comparison) -> String {
    let d = &c.deltas;
    let mut out = format!(
        "before {} · after {} · {} common items ({} only before, {} only after)\n",
        before.display(),
        after.display(),
        c.common_items,
        c.only_in_before.count,
        c.only_in_after.count
    );
    let signed = |v: Option<f64>| v.map_or_else(|| "n/a".into(), |v| format!("{v:+.3}"));
    out.push_str(&format!(
        "precision {} → {} ({})\nrecall    {} → {} ({})\nF1        {} → {} ({})\naccuracy  {} → {} ({})\n\
         needs_review rate {} → {} · latency p50 {} ms · completion tokens {}\n",
        fmt_score(c.before.metrics.precision),
        fmt_score(c.after.metrics.precision),
        signed(d.precision),
        fmt_score(c.before.metrics.recall),
        fmt_score(c.after.metrics.recall),
        signed(d.recall),
        fmt_score(c.before.metrics.f1),
        fmt_score(c.after.metrics.f1),
        signed(d.f1),
        fmt_score(c.before.metrics.accuracy),
        fmt_score(c.after.metrics.accuracy),
        signed(d.accuracy),
        fmt_rate(c.before.needs_review.rate),
        fmt_rate(c.after.needs_review.rate),
        signed(d.latency_p50_ms),
        signed(d.completion_tokens_mean)
    ));
    out.push_str(&format!(
        "{} flipped: {} fixed, {} broken, {} changed\n",
        c.flips.len(),
        c.fixed,
        c.broken,
        c.changed
    ));
    if c.failed.count > 0 {
        out.push_str(&format!(
            "{} item(s) failed in a run and are left out of the flips: {}\n",
            c.failed.count,
            c.failed.ids.join(", ")
        ));
    }
    for flip in &c.flips {
        let label = match flip.label {
            Some(true) => "violating",
            Some(false) => "safe",
            None => "unknown",
        };
        out.push_str(&format!(
            "  {:<8} {} [{label}] {} → {}: {}\n",
            format!("{:?}", flip.kind).to_lowercase(),
            flip.id,
            flip.before.as_str(),
            flip.after.as_str(),
            excerpt(&flip.text.replace('\n', " "), 80)
        ));
    }
    out
}

/// Writes records as JSONL.
fn write_predictions(writer: &mut impl Write, records: &[PredictionRecord]) -> anyhow::Result<()> {
    for record in records {
        serde_json::to_writer(&mut *writer, record)?;
        writer.write_all(b"\n")?;
    }
    Ok(())
}

/// An output path that is one of the run's inputs (the dataset, the cache, saved predictions, a policy) would be
/// overwritten with the run's results.
fn refuse_input_path(output: &Path, args: &Args) -> anyhow::Result<()> {
    refuse_over_inputs(output, args, args.cache.as_deref())
}

fn refuse_over_inputs(output: &Path, args: &Args, cache: Option<&Path>) -> anyhow::Result<()> {
    let inputs = [Some(Path::new(&args.dataset)), cache, args.predictions.as_deref()];
    let compared = args.compare.iter().flatten().map(PathBuf::as_path);
    let policies = args.policy.iter().map(Path::new);
    for input in inputs.into_iter().flatten().chain(compared).chain(policies) {
        super::classify::refuse_output_over_input(input, output)?;
    }
    Ok(())
}

pub(super) fn check_parent_exists(path: &Path) -> anyhow::Result<()> {
    let parent = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("cannot write {}: the folder {} does not exist", path.display(), parent.display());
    }
    Ok(())
}

mod live {
    //! Live evaluation through the core `Classifier`, on the reasoner `classify` builds.

    use std::sync::Arc;

    use safeguard_core::{Classifier, ClassifyOptions};
    use safeguard_eval::{FnClassifier, Item, RunOptions, RunOutput, fingerprint, run_eval};
    use safeguard_harmony::{Content, Effort};

    use super::super::classify::{EngineArgs, load_reasoner, runtime};
    use super::*;

    async fn classify_one(
        classifier: &Classifier,
        policies: &[Policy],
        options: ClassifyOptions,
        item: Item,
    ) -> Result<PredictionRecord, String> {
        let decision = classifier.classify(policies, &Content::text(item.text), &options).await;
        // A prompt the backend failed is a failed classification, not the model's answer: it must not be cached
        // as one (a resumed run would never ask again) nor scored as the model's `needs_review`.
        let errors: Vec<&str> = decision.prompts.iter().filter_map(|p| p.error.as_deref()).collect();
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let mut value = serde_json::to_value(&decision).map_err(|e| e.to_string())?;
        if let Some(object) = value.as_object_mut() {
            // Keyed by the dataset id, as classify keys its output by the caller's id; the UUID stays beside it.
            if let Some(decision_id) = object.remove("id") {
                object.insert("decision_id".into(), decision_id);
            }
            object.insert("id".into(), serde_json::Value::String(item.id));
        }
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    /// Everything besides the policy bodies that changes an answer, as one fingerprint for the cache key: each
    /// policy's front matter (its output format, `escalate_on`, `high_risk`… decide the verdict, yet do not change
    /// the body hash), the token cap, the engine settings that change what is decoded, and the model file's size
    /// and modification time (two models may share a file name). Threads and concurrency change only the speed.
    fn cache_settings(args: &Args, policies: &[Policy], model: &Path) -> anyhow::Result<String> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        for policy in policies {
            parts.push(serde_json::to_vec(&policy.meta).context("cannot serialize a policy's front matter")?);
        }
        parts.push(format!("max_tokens={:?}", args.max_tokens).into_bytes());
        parts.push(format!("context={:?};gpu_layers={}", args.engine.context, args.engine.gpu_layers).into_bytes());
        let metadata = std::fs::metadata(model).with_context(|| format!("cannot read {}", model.display()))?;
        let modified = metadata
            .modified()
            .ok()
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|since| since.as_nanos());
        parts.push(format!("model_bytes={};model_modified={modified:?}", metadata.len()).into_bytes());
        Ok(fingerprint(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>()))
    }

    pub fn run(
        args: &Args,
        dataset: Dataset,
        options: ScoreOptions,
        policies: Vec<Policy>,
    ) -> anyhow::Result<ExitCode> {
        if policies.is_empty() {
            bail!("a live run needs at least one --policy FILE");
        }
        // Checked before the run, not after it: a mistyped --map would otherwise cost a whole run to find out.
        let names: Vec<&str> = policies.iter().map(|p| p.meta.name.as_str()).collect();
        if let Some(unknown) = options.policy_labels.keys().find(|name| !names.contains(&name.as_str())) {
            bail!("--map names policy `{unknown}`, which is not among the policies run: {}", names.join(", "));
        }
        safeguard_eval::check_mapped_categories(&dataset, &options)?;
        // The cache is read and written: an input to every other output, checked against the others itself.
        if let Some(cache) = &args.cache {
            refuse_over_inputs(cache, args, None)?;
        }
        let mut efforts = Vec::new();
        for effort in &args.effort {
            let parsed: Effort = effort.parse().map_err(|e| anyhow::anyhow!("--effort {effort}: {e}"))?;
            efforts.push(parsed.to_string());
        }
        // Output paths are checked before the model is loaded, so that a missing directory or a path that names
        // the dataset is found before the run, not after hours of it (the HTML report's in `run`, for every mode).
        let mut prediction_paths = Vec::new();
        if let Some(path) = &args.save_predictions {
            for effort in &efforts {
                let path = if efforts.len() > 1 { per_effort_path(path, effort) } else { path.clone() };
                refuse_input_path(&path, args)?;
                check_parent_exists(&path)?;
                prediction_paths.push((effort.clone(), path));
            }
        }
        let output = evaluate(args, &dataset, &policies, efforts)?;
        eprintln!("{} classified, {} from cache, {} failed", output.classified, output.from_cache, output.failed.len());
        for (id, effort, error) in output.failed.iter().take(10) {
            eprintln!("  failed {id} at {effort}: {error}");
        }

        // Every file is written, and the report printed, before a failure to write one is reported. Each appears
        // whole or not at all: an earlier file of the same name is kept if this one cannot be written.
        let mut write_errors = Vec::new();
        for (effort, path) in prediction_paths {
            let records =
                output.by_effort.iter().find(|(name, _)| *name == effort).map_or(&[][..], |(_, records)| records);
            let written = OutputFile::create(&path).and_then(|mut file| {
                let result = write_predictions(&mut file.writer, records);
                file.finish(result)
            });
            match written {
                Ok(()) => eprintln!("wrote {}", path.display()),
                Err(error) => write_errors.push(error),
            }
        }
        let mut reports = Vec::new();
        for (effort, records) in &output.by_effort {
            reports.push((effort.clone(), score_predictions(records, &dataset, &options)?));
        }
        let code = emit_report(args, &reports)?;
        if let Some(error) = write_errors.into_iter().next() {
            return Err(error.context("the predictions could not all be saved"));
        }
        if !output.failed.is_empty() && code == ExitCode::SUCCESS {
            // The report is complete, but some items were never judged: the run did not fully work.
            return Ok(ExitCode::from(EXIT_FAILURE));
        }
        Ok(code)
    }

    /// Loads the model and runs every item at every effort.
    fn evaluate(
        args: &Args,
        dataset: &Dataset,
        policies: &[Policy],
        efforts: Vec<String>,
    ) -> anyhow::Result<RunOutput> {
        let model = args.model.as_deref().context("--model is required for a live run")?;
        let reasoner = load_reasoner(&EngineArgs { model, engine: args.engine, sequences: args.concurrency.max(1) })?;
        let model_id = reasoner.model_id();
        // The cache key must change whenever the answer could: policy texts here, the rest in `settings`.
        let policy_hash = policies.iter().map(|p| p.hash.to_string()).collect::<Vec<_>>().join("+");
        let settings = cache_settings(args, policies, model)?;
        let shared = Arc::new((Classifier::new(reasoner), policies.to_vec()));
        let max_tokens = args.max_tokens;
        let adapter = FnClassifier(move |item: Item, effort: String| {
            let shared = Arc::clone(&shared);
            Box::pin(async move {
                let effort: Effort = effort.parse().map_err(|e| format!("{e}"))?;
                let options = ClassifyOptions { effort, max_tokens, ..ClassifyOptions::default() };
                classify_one(&shared.0, &shared.1, options, item).await
            })
                as std::pin::Pin<Box<dyn std::future::Future<Output = Result<PredictionRecord, String>> + Send>>
        });

        let run_options = RunOptions {
            efforts,
            concurrency: args.concurrency,
            cache_path: args.cache.clone(),
            policy_hash,
            settings,
            model_id,
            unclassifiable: dataset.text_errors.clone(),
            ..RunOptions::default()
        };
        let total = (dataset.items.len() * run_options.efforts.len()) as u64;
        let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} items · {elapsed} elapsed · eta {eta} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let output = runtime()?.block_on(run_eval(&dataset.items, &adapter, &run_options, &|progress| {
            bar.set_position(progress.done as u64);
            bar.set_message(format!("({} cached, {} failed)", progress.from_cache, progress.failed));
        }))?;
        bar.finish_and_clear();
        Ok(output)
    }

    fn per_effort_path(path: &Path, effort: &str) -> PathBuf {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("predictions");
        let extension = path.extension().and_then(|s| s.to_str()).unwrap_or("jsonl");
        path.with_file_name(format!("{stem}.{effort}.{extension}"))
    }
}

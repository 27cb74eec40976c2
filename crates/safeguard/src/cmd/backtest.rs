//! `safeguard policy backtest`: shadow-run a new policy version over stored decisions (or a dataset) and report
//! which items would flip before the new version is activated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use safeguard_core::{Classifier, ClassifyOptions};
use safeguard_eval::html::render_comparison_html;
use safeguard_eval::{Comparison, Dataset, DatasetSpec, Item, Predicted, PredictionRecord, ScoreOptions, compare_runs};
use safeguard_harmony::{Content, Effort, user_message_text};
use safeguard_pipeline::flywheel::stored_verdict_stage;
use safeguard_policy::Policy;
use safeguard_store::{DecisionFilter, Migrations, Store, StoreOptions};
use serde::Serialize;

use super::classify::{EngineArgs, load_reasoner, runtime};
use super::output_file::OutputFile;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
pub struct Args {
    /// The new policy version (its front-matter name selects the stored decisions).
    #[arg(long, value_name = "FILE")]
    policy: PathBuf,
    /// Database the service stores decisions in (sqlite://FILE or postgres://…).
    #[arg(long, value_name = "URL", conflicts_with = "dataset", required_unless_present = "dataset")]
    database: Option<String>,
    /// With --database: the PostgreSQL schema the service keeps its tables in, as given to `safeguard serve`.
    #[arg(long, value_name = "NAME", env = "SAFEGUARD_DATABASE_SCHEMA")]
    database_schema: Option<String>,
    /// A JSONL/CSV file or named shared dataset to run the new version on instead.
    #[arg(long, value_name = "SPEC")]
    dataset: Option<String>,
    /// With --dataset: the version in force now, run beside the new one.
    #[arg(long, value_name = "FILE", requires = "dataset")]
    baseline_policy: Option<PathBuf>,
    /// Folder holding the shared datasets [default: shared/data or ../shared/data].
    #[arg(long, env = "SAFEGUARD_DATASETS_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// With --dataset: how a file's fields are read.
    #[command(flatten)]
    fields: super::eval::DatasetFields,
    /// The model (GGUF) that runs the new version.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Reasoning effort of the new version's run [default: with --database, the effort most stored verdicts
    /// were judged at, so that a flip is the wording's and not the effort's; with --dataset, medium].
    #[arg(long)]
    effort: Option<String>,
    /// At most this many items (newest stored decisions first, at most 1000 of them; a dataset's first N).
    #[arg(long, value_name = "N", default_value_t = 200)]
    limit: usize,
    /// Completion-token cap per prompt [default: the budget for the effort].
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Also write a self-contained HTML report here.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    #[command(flatten)]
    engine: super::classify::EngineFlags,
}

/// Examples kept per flip direction: enough to judge a change, short enough to read.
const EXAMPLES_PER_DIRECTION: usize = 5;

#[derive(Serialize)]
struct Side {
    outcome: Predicted,
    label: Option<String>,
    rationale: Option<String>,
}

#[derive(Serialize)]
struct BacktestItem {
    id: String,
    excerpt: String,
    before: Side,
    after: Side,
}

#[derive(Serialize)]
struct Report {
    policy: String,
    policy_hash: String,
    source: String,
    /// Items run under both versions.
    items: usize,
    /// Stored decisions that could not be replayed, with why.
    skipped: Vec<(String, String)>,
    /// Items the model failed to judge (a backend error, a prompt too long for the context), with why: left out
    /// of the flips, since a failure says nothing about the policy.
    failed: Vec<(String, String)>,
    before: BTreeMap<Predicted, usize>,
    after: BTreeMap<Predicted, usize>,
    unchanged: usize,
    /// "before->after" -> count.
    flips: BTreeMap<String, usize>,
    examples: BTreeMap<String, Vec<BacktestItem>>,
    /// Every item's before and after, so that nothing is silently dropped.
    results: Vec<BacktestItem>,
    /// With labels (datasets): metric deltas and right/wrong flips as `safeguard eval --compare` reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    comparison: Option<Comparison>,
}

fn outcome_name(p: Predicted) -> &'static str {
    match p {
        Predicted::Allow => "allow",
        Predicted::Violation => "violation",
        Predicted::NeedsReview => "needs_review",
    }
}

/// Most stored decisions one backtest reads (one page of `Store::list_decisions`).
const MAX_STORED_ITEMS: usize = 1000;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Checked before the model runs, not after: the report must not replace an input (the dataset, a policy, a
    // SQLite database), and a folder that is not there would throw the whole run away.
    if let Some(path) = &args.html {
        let inputs = [Some(args.policy.as_path()), args.baseline_policy.as_deref()];
        let dataset = args.dataset.as_deref().map(Path::new);
        let database = args
            .database
            .as_deref()
            .and_then(|url| url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")));
        let database = database.map(|file| Path::new(file.split('?').next().unwrap_or(file)));
        for input in inputs.into_iter().chain([dataset, database]).flatten() {
            super::classify::refuse_output_over_input(input, path)?;
        }
        super::eval::check_parent_exists(path)?;
    }
    let policy = Policy::load(&args.policy).with_context(|| format!("cannot load policy {}", args.policy.display()))?;
    let runtime = runtime()?;
    let mut contents = BTreeMap::new();
    let (source, dataset, before) = match (&args.database, &args.dataset) {
        (Some(url), _) => {
            // The store lists at most 1000 decisions a call; asking for more must not quietly give fewer.
            anyhow::ensure!(
                args.limit <= MAX_STORED_ITEMS,
                "--limit {}: a backtest of stored decisions takes at most {MAX_STORED_ITEMS}",
                args.limit
            );
            let (dataset, before, skipped, stored_effort) = runtime.block_on(stored_decisions(
                url,
                args.database_schema.clone(),
                &policy,
                args.limit,
                &mut contents,
            ))?;
            // A PostgreSQL URL may carry a password; it must not end up in reports.
            let source = if url.starts_with("sqlite:") { url.clone() } else { "the database".to_string() };
            (source, dataset, Before::Stored(before, skipped, stored_effort))
        }
        (None, Some(spec)) => {
            let baseline = args
                .baseline_policy
                .as_ref()
                .map(|p| Policy::load(p).with_context(|| format!("cannot load policy {}", p.display())).map(Box::new))
                .transpose()?;
            let dataset = load_dataset(&args, spec, &policy.meta.name, baseline.is_some())?;
            (spec.clone(), dataset, Before::Baseline(baseline))
        }
        (None, None) => bail!("say where the items come from: --database URL or --dataset SPEC"),
    };
    if dataset.items.is_empty() {
        // Every stored decision may have been passed over: say why, or "no items" hides a store full of them.
        if let Before::Stored(_, skipped, _) = &before
            && !skipped.is_empty()
        {
            let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
            for (_, why) in skipped {
                *reasons.entry(why.as_str()).or_default() += 1;
            }
            let reasons: Vec<String> = reasons.iter().map(|(why, count)| format!("{count} {why}")).collect();
            bail!(
                "nothing to backtest: every stored decision of {source} was passed over ({}); a version differs from \
                 another by its body, so a change of front matter alone is the same version",
                reasons.join("; ")
            );
        }
        bail!("nothing to backtest: {source} has no items");
    }

    // Read before the model loads: a typo should not cost a model load.
    let effort: Effort = match (&args.effort, &before) {
        (Some(effort), _) => effort.parse().map_err(|e| anyhow::anyhow!("--effort {effort}: {e}"))?,
        (None, Before::Stored(_, _, Some(stored))) => {
            eprintln!("running at {stored} effort, as most stored verdicts were (--effort to choose)");
            *stored
        }
        (None, _) => Effort::Medium,
    };
    let reasoner = load_reasoner(&EngineArgs { model: &args.model, engine: args.engine, sequences: 4 })?;
    let classifier = Classifier::new(reasoner);
    let options = ClassifyOptions { effort, max_tokens: args.max_tokens, ..ClassifyOptions::default() };
    // Rows without text to judge fail once, whichever runs skip them.
    let mut failed: Vec<(String, String)> = dataset.text_errors.clone().into_iter().collect();
    let after = runtime.block_on(classify_all(&classifier, &policy, &dataset, &contents, &options, &mut failed))?;
    if after.is_empty() {
        // Nothing to compare: say why, rather than a scoring error about a policy with no verdicts.
        for (id, why) in failed.iter().take(5) {
            eprintln!("{id}: {why}");
        }
        bail!("no item could be judged under the new version ({} failed; the first are above)", failed.len());
    }
    let (before, skipped) = match before {
        Before::Stored(records, skipped, _) => (records, skipped),
        Before::Baseline(Some(old)) => {
            let records = classify_all(&classifier, &old, &dataset, &contents, &options, &mut failed);
            (runtime.block_on(records)?, vec![])
        }
        // No baseline on a dataset: the labels are the "before", so flips show where the new version is wrong.
        Before::Baseline(None) => (label_records(&dataset, &policy.meta.name), vec![]),
    };

    let score_options = ScoreOptions { policy: Some(policy.meta.name.clone()), ..ScoreOptions::default() };
    let comparison = compare_runs(&before, &after, &dataset, &score_options)?;
    let mut report = build_report(&policy, source, &dataset, &before, &after, skipped, comparison);
    report.failed = failed;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => print!("{}", text_report(&report)),
    }
    if let (Some(path), Some(comparison)) = (&args.html, &report.comparison) {
        let title =
            format!("safeguard policy backtest: {} ({}) on {}", report.policy, report.policy_hash, report.source);
        // Whole or not at all: an earlier report of the same name stays if this one cannot be written.
        OutputFile::write_whole(path, render_comparison_html(&title, comparison).as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    if !report.failed.is_empty() {
        eprintln!("{} item(s) could not be judged; the backtest is incomplete", report.failed.len());
        return Ok(ExitCode::from(super::EXIT_FAILURE));
    }
    Ok(ExitCode::SUCCESS)
}

enum Before {
    /// The stored verdicts, the decisions left out with why, and the effort most of the verdicts were judged at.
    Stored(Vec<PredictionRecord>, Vec<(String, String)>, Option<Effort>),
    Baseline(Option<Box<Policy>>),
}

/// The stored decisions in which the model judged another version of this policy (by name), as a label-less
/// dataset plus the stored verdicts as the "before" run. Left out, with why: verdicts triage settled (its rules
/// and classifier are not the policy text, so a flip would blame the new wording for what triage did) and
/// verdicts already given under the version being tested (nothing changed for them).
async fn stored_decisions(
    url: &str,
    schema: Option<String>,
    policy: &Policy,
    limit: usize,
    contents: &mut BTreeMap<String, Content>,
) -> anyhow::Result<(Dataset, Vec<PredictionRecord>, Vec<(String, String)>, Option<Effort>)> {
    let policy_name = policy.meta.name.as_str();
    let new_version = policy.hash.to_string();
    // A mistyped database or schema must not be created and migrated just to be found empty.
    if !safeguard_store::store_exists(url, schema.as_deref()).await.context("cannot open the database")? {
        bail!("no safeguard store at that database{}", schema.map(|s| format!(" (schema {s})")).unwrap_or_default());
    }
    let options = StoreOptions { schema, migrations: Migrations::RequireApplied, ..Default::default() };
    let store = Store::connect(url, options).await.context("cannot open the database")?;
    let filter = DecisionFilter {
        policy: Some(policy_name.to_string()),
        limit: i64::try_from(limit).unwrap_or(i64::MAX),
        ..DecisionFilter::default()
    };
    let decisions = store.list_decisions(&filter).await.context("reading stored decisions")?;
    let mut efforts: BTreeMap<Effort, usize> = BTreeMap::new();
    if decisions.is_empty() {
        let any = store.list_decisions(&DecisionFilter { limit: 1, ..DecisionFilter::default() }).await?;
        if any.is_empty() {
            bail!("the database holds no decisions: nothing to backtest against");
        }
        bail!("no stored decision judged a policy named `{policy_name}`: check the policy's front-matter name");
    }
    let mut items = Vec::new();
    let mut before = Vec::new();
    let mut skipped = Vec::new();
    for decision in decisions {
        let content: Content = match serde_json::from_value(decision.content.clone()) {
            Ok(content) => content,
            Err(error) => {
                skipped.push((decision.id, format!("stored content is unreadable: {error}")));
                continue;
            }
        };
        let verdicts: Vec<serde_json::Value> = match decision.verdicts.as_array() {
            Some(all) => all.iter().filter(|v| v["policy"] == policy_name).cloned().collect(),
            None => vec![],
        };
        if verdicts.is_empty() {
            skipped.push((decision.id, format!("no stored verdict for `{policy_name}`")));
            continue;
        }
        let verdicts: Vec<serde_json::Value> = match verdicts.into_iter().map(model_answer).collect() {
            Ok(verdicts) => verdicts,
            Err(why) => {
                skipped.push((decision.id, why.to_string()));
                continue;
            }
        };
        if verdicts.iter().all(|v| v["policy_hash"] == new_version.as_str()) {
            skipped.push((decision.id, "already judged under this version".to_string()));
            continue;
        }
        let judged_at: Vec<Effort> = verdicts
            .iter()
            .filter_map(|verdict| stored_verdict_stage(verdict, &decision.effort).ok().and_then(|stage| stage.effort()))
            .collect();
        let record = serde_json::json!({ "id": decision.id, "verdicts": verdicts, "model": decision.model_id });
        let record: PredictionRecord = match serde_json::from_value(record) {
            Ok(record) => record,
            Err(error) => {
                skipped.push((decision.id, format!("stored verdict is unreadable: {error}")));
                continue;
            }
        };
        for effort in judged_at {
            *efforts.entry(effort).or_default() += 1;
        }
        items.push(Item {
            id: decision.id,
            text: user_message_text(&content),
            label: None,
            categories: BTreeMap::new(),
            group: None,
        });
        before.push((record, content));
    }
    let dataset = Dataset::new("stored decisions", items)?;
    // Conversations and prompt/response pairs are replayed as they were judged, not flattened to text.
    contents.extend(before.iter().map(|(r, content)| (r.id.clone(), content.clone())));
    if efforts.len() > 1 {
        let counts: Vec<String> = efforts.iter().map(|(effort, n)| format!("{n} at {effort}")).collect();
        eprintln!(
            "the stored verdicts were judged at several efforts ({}): a flip may come from the effort, not the wording",
            counts.join(", ")
        );
    }
    let most_common = efforts.into_iter().max_by_key(|&(effort, n)| (n, effort)).map(|(effort, _)| effort);
    Ok((dataset, before.into_iter().map(|(r, _)| r).collect(), skipped, most_common))
}

/// A stored cascade verdict as the model's own answer, or why there is none to compare with. Where the cascade
/// overrode the model (an appeal, an answer still unsure at the last effort) the stored outcome is the person's
/// `needs_review` and the model's is kept beside it; a flip from that `needs_review` would blame the new wording
/// for what routing did. Triage's verdicts, items triage sent straight to a person, and steps that failed carry
/// no answer of the model at all.
fn model_answer(mut verdict: serde_json::Value) -> Result<serde_json::Value, &'static str> {
    if verdict["stage"] == "triage" {
        return Err("settled by triage, not by the model");
    }
    if let Some(model_outcome) = verdict.get("model_outcome").cloned() {
        verdict["outcome"] = model_outcome;
        return Ok(verdict);
    }
    let escalated =
        |kind: &str| verdict["escalations"].as_array().is_some_and(|all| all.iter().any(|e| e["kind"] == kind));
    if verdict["stage"] == "human_review" && escalated("triage_violation_to_review") {
        return Err("sent to a person by triage; the model never judged it");
    }
    // A cascade records the failure as an escalation; a direct decision (a pinned effort) only in the verdict's
    // rationale.
    let failed_directly = verdict["rationale"]
        .as_str()
        .is_some_and(|rationale| rationale.starts_with(safeguard_core::FAILED_STEP_RATIONALE));
    if verdict["outcome"] == "needs_review" && (escalated("stage_failed") || failed_directly) {
        return Err("the model's step failed; it gave no answer to compare with");
    }
    Ok(verdict)
}

fn load_dataset(args: &Args, spec: &str, policy_name: &str, compared_with_a_policy: bool) -> anyhow::Result<Dataset> {
    let data_dir = super::eval::shared_data_dir(args.data_dir.as_deref());
    let parsed: DatasetSpec = spec.parse()?;
    let mapping = args.fields.mapping();
    let mut dataset = parsed.load(&data_dir, &mapping).with_context(|| format!("loading dataset {spec}"))?;
    args.fields.report_read_as_negative(&dataset);
    // An export labels several policies; the new version is judged on its own policy's labels.
    dataset.focus_on_policy(policy_name)?;
    // Without a baseline policy the labels are what the new version is compared with: an item without one would be
    // judged, at the model's cost, and then have nothing to be compared with.
    if !compared_with_a_policy {
        let unlabelled = dataset.keep_labelled();
        if unlabelled > 0 {
            eprintln!(
                "left out {unlabelled} item(s) with no label for {policy_name}: nothing to compare the new version \
                 with (--baseline-policy compares with another version instead)"
            );
        }
    }
    let total = dataset.items.len();
    dataset.truncate(args.limit);
    if dataset.items.len() < total {
        eprintln!("backtesting the first {} of {total} items (--limit)", dataset.items.len());
    }
    Ok(dataset)
}

async fn classify_all(
    classifier: &Classifier,
    policy: &Policy,
    dataset: &Dataset,
    contents: &BTreeMap<String, Content>,
    options: &ClassifyOptions,
    failed: &mut Vec<(String, String)>,
) -> anyhow::Result<Vec<PredictionRecord>> {
    let mut records = Vec::with_capacity(dataset.items.len());
    for item in &dataset.items {
        // A row without text to judge is a failure (counted by the caller), never an empty message judged.
        if dataset.text_errors.contains_key(&item.id) {
            continue;
        }
        let content = contents.get(&item.id).cloned().unwrap_or_else(|| Content::text(item.text.clone()));
        let decision = classifier.classify(std::slice::from_ref(policy), &content, options).await;
        let errors: Vec<&str> = decision.prompts.iter().filter_map(|p| p.error.as_deref()).collect();
        if !errors.is_empty() {
            failed.push((
                item.id.clone(),
                format!("{} ({}): {}", policy.meta.name, policy.hash.short(), errors.join("; ")),
            ));
            continue;
        }
        let mut value = serde_json::to_value(&decision)?;
        if let Some(object) = value.as_object_mut() {
            object.remove("id");
            object.insert("id".into(), serde_json::Value::String(item.id.clone()));
        }
        records.push(serde_json::from_value(value).context("reading back a decision")?);
    }
    Ok(records)
}

fn label_records(dataset: &Dataset, policy_name: &str) -> Vec<PredictionRecord> {
    dataset
        .items
        .iter()
        .filter_map(|item| {
            let label = item.label?;
            let outcome = if label { "violation" } else { "allow" };
            let value = serde_json::json!({ "id": item.id, "verdicts": [
                { "policy": policy_name, "violation": label, "label": "dataset label", "outcome": outcome }
            ]});
            serde_json::from_value(value).ok()
        })
        .collect()
}

fn side(record: &PredictionRecord, policy: &str) -> Side {
    let verdict = record.verdicts.iter().find(|v| v.policy == policy);
    Side {
        outcome: record.predicted(Some(policy)),
        label: verdict.and_then(|v| v.label.clone()),
        rationale: record.rationale(Some(policy)).map(|r| safeguard_eval::excerpt(r, 500)),
    }
}

fn build_report(
    policy: &Policy,
    source: String,
    dataset: &Dataset,
    before: &[PredictionRecord],
    after: &[PredictionRecord],
    skipped: Vec<(String, String)>,
    comparison: Comparison,
) -> Report {
    let name = policy.meta.name.as_str();
    let before_by_id: BTreeMap<&str, &PredictionRecord> = before.iter().map(|r| (r.id.as_str(), r)).collect();
    let after_by_id: BTreeMap<&str, &PredictionRecord> = after.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut report = Report {
        policy: name.to_string(),
        policy_hash: policy.hash.to_string(),
        source,
        items: 0,
        skipped,
        failed: Vec::new(),
        before: BTreeMap::new(),
        after: BTreeMap::new(),
        unchanged: 0,
        flips: BTreeMap::new(),
        examples: BTreeMap::new(),
        results: Vec::new(),
        comparison: None,
    };
    for item in &dataset.items {
        let (Some(old), Some(new)) = (before_by_id.get(item.id.as_str()), after_by_id.get(item.id.as_str())) else {
            continue;
        };
        let entry = BacktestItem {
            id: item.id.clone(),
            excerpt: safeguard_eval::excerpt(&item.text, 200),
            before: side(old, name),
            after: side(new, name),
        };
        report.items += 1;
        *report.before.entry(entry.before.outcome).or_default() += 1;
        *report.after.entry(entry.after.outcome).or_default() += 1;
        if entry.before.outcome == entry.after.outcome {
            report.unchanged += 1;
        } else {
            let direction = format!("{}->{}", outcome_name(entry.before.outcome), outcome_name(entry.after.outcome));
            *report.flips.entry(direction.clone()).or_default() += 1;
            let examples = report.examples.entry(direction).or_default();
            if examples.len() < EXAMPLES_PER_DIRECTION {
                examples.push(BacktestItem {
                    id: entry.id.clone(),
                    excerpt: entry.excerpt.clone(),
                    before: side(old, name),
                    after: side(new, name),
                });
            }
        }
        report.results.push(entry);
    }
    report.comparison = Some(comparison);
    report
}

fn text_report(report: &Report) -> String {
    let mut out = format!(
        "backtest of {} ({}) on {}: {} items, {} unchanged, {} flipped\n",
        report.policy,
        report.policy_hash,
        report.source,
        report.items,
        report.unchanged,
        report.items - report.unchanged
    );
    let distribution = |d: &BTreeMap<Predicted, usize>| {
        d.iter().map(|(k, v)| format!("{}={v}", outcome_name(*k))).collect::<Vec<_>>().join(" ")
    };
    out.push_str(&format!("  before: {}\n  after:  {}\n", distribution(&report.before), distribution(&report.after)));
    for (direction, count) in &report.flips {
        out.push_str(&format!("\n{direction}: {count}\n"));
        for example in report.examples.get(direction).into_iter().flatten() {
            out.push_str(&format!("  {}  {}\n", example.id, example.excerpt.replace('\n', " ")));
            if let Some(r) = &example.before.rationale {
                out.push_str(&format!("    before: {}\n", r.replace('\n', " ")));
            }
            if let Some(r) = &example.after.rationale {
                out.push_str(&format!("    after:  {}\n", r.replace('\n', " ")));
            }
        }
    }
    if let Some(c) = &report.comparison
        && (c.fixed + c.broken) > 0
    {
        out.push_str(&format!("\nagainst labels: {} fixed, {} broken\n", c.fixed, c.broken));
    }
    for (id, why) in &report.skipped {
        out.push_str(&format!("skipped {id}: {why}\n"));
    }
    for (id, why) in &report.failed {
        out.push_str(&format!("failed {id}: {why}\n"));
    }
    out
}

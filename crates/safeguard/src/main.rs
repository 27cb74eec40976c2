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
    /// Delete stored decisions, jobs and webhook deliveries older than a retention period.
    Prune(cmd::prune::Args),
}

/// A command whose output a reader may stop reading (`safeguard models inspect … | head`), and that holds nothing
/// to put right when it stops: the server answers on sockets, and `keys create` revokes a key whose secret it
/// could not show.
fn stdout_is_the_product(command: &Command) -> bool {
    !matches!(command, Command::Serve(_) | Command::Keys(cmd::keys::Command::Create { .. }))
}

/// Rust ignores SIGPIPE, so a write to a pipe nobody reads fails, and `println!` panics on that failure. For a
/// command line tool the Unix convention is to end as `cat` does, killed by the signal, without a message.
/// Sockets are unaffected: the standard library sends with `MSG_NOSIGNAL`.
fn die_quietly_on_a_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
    let cli = Cli::parse();
    if stdout_is_the_product(&cli.command) {
        die_quietly_on_a_closed_stdout();
    }
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
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(cmd::EXIT_FAILURE)
        }
    }
}

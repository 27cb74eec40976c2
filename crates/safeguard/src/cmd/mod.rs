//! One module per subcommand. Each exposes clap `Args`/`Command` and `run`, returning the process exit code.

pub mod backtest;
pub mod bench;
pub mod bench_server;
pub mod classify;
pub mod debug;
pub mod eval;
pub mod export;
pub mod keys;
pub mod models;
mod output_file;
pub mod policy;
pub mod prompt;
pub mod prune;
pub mod serve;
pub mod triage;
mod triage_audit;
pub mod webhooks;

/// Something went wrong that is not the content's fault: bad arguments, unreadable files, engine failure.
pub const EXIT_FAILURE: u8 = 1;
/// The command worked and found a problem: a violation, a failed golden test, a lint error.
pub const EXIT_FINDINGS: u8 = 2;
/// At least one item could not be decided and needs a person (classify only).
pub const EXIT_NEEDS_REVIEW: u8 = 3;

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

/// How a command ends when nobody reads its output any more (`safeguard models inspect … | head -1`): as a shell
/// reports a command killed by SIGPIPE (128 + 13), without a message.
pub const EXIT_CLOSED_STDOUT: i32 = 141;

/// Standard output for a command's results: a write to a pipe nobody reads any more fails with [`ClosedStdout`]
/// inside the `BrokenPipe` error, which `main` ends on quietly. A broken pipe from anywhere else (a database
/// socket) stays an error.
pub struct Stdout(std::io::StdoutLock<'static>);

impl Stdout {
    pub fn lock() -> Self {
        Stdout(std::io::stdout().lock())
    }
}

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(mark_closed)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(mark_closed)
    }
}

#[derive(Debug)]
pub struct ClosedStdout;

impl std::fmt::Display for ClosedStdout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("nobody reads standard output any more")
    }
}

impl std::error::Error for ClosedStdout {}

fn mark_closed(error: std::io::Error) -> std::io::Error {
    match error.kind() {
        std::io::ErrorKind::BrokenPipe => std::io::Error::new(std::io::ErrorKind::BrokenPipe, ClosedStdout),
        _ => error,
    }
}

/// Whether `error` came from writing to a standard output nobody reads. serde_json keeps the io error to itself
/// (its `source` skips it), so a broken pipe it reports is taken as one: the command line writes JSON only to its
/// output (stdout, a file, a named pipe), never to a socket.
pub fn stdout_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        let marked = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<ClosedStdout>());
        let json = cause.downcast_ref::<serde_json::Error>().and_then(serde_json::Error::io_error_kind);
        marked || json == Some(std::io::ErrorKind::BrokenPipe)
    })
}

/// The command worked and found a problem: a violation, a failed golden test, a lint error.
pub const EXIT_FINDINGS: u8 = 2;
/// At least one item could not be decided and needs a person (classify only).
pub const EXIT_NEEDS_REVIEW: u8 = 3;

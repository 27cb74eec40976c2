use std::path::{Path, PathBuf};

/// Why a policy could not be read. Line numbers are 1-based lines of the whole file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("policy is {bytes} bytes, over the {limit}-byte limit (a policy should be 400-600 tokens)")]
    TooLarge { bytes: usize, limit: usize },
    #[error("invalid UTF-8 at line {line}, column {column} (byte {byte_offset}); save the policy as UTF-8")]
    InvalidUtf8 { line: usize, column: usize, byte_offset: usize },
    /// Text with a NUL is no policy anyone wrote (a binary file, a broken export), and PostgreSQL cannot store it.
    #[error("a NUL character at line {line}: a policy is text")]
    NulCharacter { line: usize },
    #[error("front matter opened by `---` on line {line} is never closed by a `---` line")]
    UnclosedFrontMatter { line: usize },
    #[error("front matter is {bytes} bytes, over the {limit}-byte limit")]
    FrontMatterTooLarge { bytes: usize, limit: usize },
    #[error("malformed front matter at line {line}: {message}")]
    FrontMatter { line: usize, message: String },
    #[error("front matter field `{field}` (line {line}): {message}")]
    FrontMatterField { field: String, line: usize, message: String },
    #[error(
        "the policy body is empty (nothing after the front matter, from line {line}); the body is what the model reads"
    )]
    EmptyBody { line: usize },
    #[error(
        "cannot tell the output format from the policy text; declare it in the front matter, e.g. `output: json` \
         (one of: binary, labels, json)"
    )]
    UndeterminedOutput,
    #[error("the policy has {count} {what}, over the limit of {limit}; a policy the model reads well has a few dozen")]
    TooManyParts { what: &'static str, count: usize, limit: usize },
    #[error("the policy has no name: add `name:` to the front matter or start the body with a `# ` heading")]
    NoName,
    #[error("{path}: {source}")]
    InFile { path: PathBuf, source: Box<PolicyError> },
}

impl PolicyError {
    /// Attach the file the error came from (once).
    pub fn at_path(self, path: &Path) -> PolicyError {
        match self {
            err @ (PolicyError::Io { .. } | PolicyError::InFile { .. }) => err,
            other => PolicyError::InFile { path: path.to_path_buf(), source: Box::new(other) },
        }
    }

    /// The file line the problem is on, when there is one.
    pub fn line(&self) -> Option<usize> {
        match self {
            PolicyError::InvalidUtf8 { line, .. }
            | PolicyError::UnclosedFrontMatter { line }
            | PolicyError::FrontMatter { line, .. }
            | PolicyError::FrontMatterField { line, .. }
            | PolicyError::NulCharacter { line }
            | PolicyError::EmptyBody { line } => Some(*line),
            PolicyError::InFile { source, .. } => source.line(),
            PolicyError::Io { .. }
            | PolicyError::TooLarge { .. }
            | PolicyError::FrontMatterTooLarge { .. }
            | PolicyError::TooManyParts { .. }
            | PolicyError::UndeterminedOutput
            | PolicyError::NoName => None,
        }
    }
}

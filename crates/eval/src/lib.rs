//! Datasets, metrics, comparisons and offline HTML reports for policies.
//!
//! Policies are software: before a policy change ships, a team scores it on labelled data and compares it with
//! the version it replaces. This crate does that from saved `safeguard classify` output ([`score_predictions`],
//! [`compare_runs`]) or live through any classifier ([`run_eval`], resumable through a JSONL cache), and renders
//! the result as JSON or as one self-contained HTML file ([`html::render_html`]).
//!
//! It reads predictions through its own lenient view of the classify output ([`PredictionRecord`]) so that saved
//! runs stay readable while the verdict types evolve.

pub mod compare;
pub mod dataset;
pub mod html;
pub mod metrics;
pub mod predictions;
pub mod run;
pub mod score;

use std::path::PathBuf;

pub use compare::{Comparison, Flip, FlipKind, MetricDeltas, compare_runs};
pub use dataset::{Dataset, DatasetSpec, FieldMapping, Item};
pub use metrics::{Confusion, Distribution, Metrics};
pub use predictions::{
    Outcome, Predicted, PredictedVerdict, PredictionRecord, Predictions, Unjoinable, Usage, parse_prediction_line,
    read_predictions,
};
pub use run::{
    CacheKey, EvalCache, FnClassifier, ItemClassifier, Progress, RunOptions, RunOutput, fingerprint, run_eval,
};
pub use score::{ScoreOptions, ScoreReport, check_mapped_categories, score_predictions};

/// Everything that can go wrong while loading data or scoring it. Data errors carry the file and line so the
/// user can fix the input.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Data { path: PathBuf, line: usize, message: String },
    #[error("bad dataset spec `{spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error("{0}")]
    Options(String),
}

/// The first `max_chars` characters of `text`, with an ellipsis when cut, for tables and flip lists.
pub fn excerpt(text: &str, max_chars: usize) -> String {
    let mut chars = text.char_indices();
    match chars.nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::excerpt;

    #[test]
    fn excerpt_cuts_on_char_boundaries() {
        assert_eq!(excerpt("héllo", 2), "hé…");
        assert_eq!(excerpt("héllo", 5), "héllo");
        assert_eq!(excerpt("", 3), "");
    }
}

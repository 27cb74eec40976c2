//! The starter library: policies shipped inside the binary, with their golden test cases.

use crate::Policy;

/// One shipped policy file and its golden tests (`<name>.tests.jsonl`).
#[derive(Debug, Clone, Copy)]
pub struct StarterPolicy {
    /// File name under `policies/`, e.g. `spam.md`.
    pub file_name: &'static str,
    pub source: &'static str,
    /// JSON lines: `{"id": "...", "text": "...", "expected": "violation"|"allow"}`.
    pub tests: &'static str,
}

macro_rules! starter {
    ($name:literal) => {
        StarterPolicy {
            file_name: concat!($name, ".md"),
            source: include_str!(concat!("../../../policies/", $name, ".md")),
            tests: include_str!(concat!("../../../policies/", $name, ".tests.jsonl")),
        }
    };
}

pub const STARTER_POLICIES: &[StarterPolicy] = &[
    starter!("spam"),
    starter!("hate"),
    starter!("harassment"),
    starter!("violence"),
    starter!("self-harm"),
    starter!("sexual"),
    starter!("prompt-injection"),
];

/// The shipped policies, parsed. Each is covered by a test that it parses and lints clean, so none is
/// ever dropped here in practice; a broken one is logged and skipped rather than taking the process down.
pub fn starter_library() -> Vec<Policy> {
    STARTER_POLICIES
        .iter()
        .filter_map(|starter| {
            let stem = starter.file_name.trim_end_matches(".md");
            match Policy::parse_with_fallback_name(starter.source, Some(stem)) {
                Ok(policy) => Some(policy),
                Err(err) => {
                    tracing::error!(file = starter.file_name, error = %err, "shipped starter policy does not parse");
                    None
                }
            }
        })
        .collect()
}

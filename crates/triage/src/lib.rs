//! Fast triage: rules (keywords, regexes, allow/deny lists) and a learned hashed n-gram classifier.

pub mod features;

#[derive(Debug, thiserror::Error)]
pub enum TriageError {
    #[error("invalid triage configuration: {0}")]
    InvalidConfig(String),
}

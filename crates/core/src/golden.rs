//! Golden cases beside a policy (`<policy>.tests.jsonl`): known content with the outcome the policy
//! must give, run as a regression gate whenever the policy text or the model changes.
//!
//! Line shape: `{"id": "...", "text": "...", "expected": "violation" | "allow"}`.

use std::path::{Path, PathBuf};

use safeguard_harmony::Content;
use safeguard_policy::Policy;
use safeguard_verdict::Outcome;
use serde::{Deserialize, Serialize};

use crate::classifier::{Classifier, ClassifyOptions, Decision};

/// What a golden case must come out as. `needs_review` is never expected: a case the model cannot decide
/// is a failed case, since the point of the gate is a policy the model can apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expected {
    Violation,
    Allow,
}

impl Expected {
    fn outcome(self) -> Outcome {
        match self {
            Expected::Violation => Outcome::Violation,
            Expected::Allow => Outcome::Allow,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GoldenCase {
    pub id: String,
    pub content: Content,
    pub expected: Expected,
    /// 1-based line in the tests file, for error messages.
    pub line: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GoldenError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {detail}")]
    BadLine { path: PathBuf, line: usize, detail: String },
    #[error("{path}: duplicate case id {id:?} (lines {first} and {second})")]
    DuplicateId { path: PathBuf, id: String, first: usize, second: usize },
    #[error("{path} holds no cases")]
    Empty { path: PathBuf },
}

/// `spam.md` -> `spam.tests.jsonl`, in the same directory.
pub fn golden_path_for(policy_path: &Path) -> PathBuf {
    let stem = policy_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    policy_path.with_file_name(format!("{stem}.tests.jsonl"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    id: String,
    text: String,
    expected: Expected,
}

/// Reads every case; any bad line fails the whole file, because a gate that silently drops a case passes
/// for the wrong reason.
pub fn load_golden_cases(path: &Path) -> Result<Vec<GoldenCase>, GoldenError> {
    let bytes = std::fs::read(path).map_err(|source| GoldenError::Read { path: path.to_path_buf(), source })?;
    // A UTF-8 byte-order mark (some editors write one) is not part of the first case's JSON.
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let bad = |line: usize, detail: String| GoldenError::BadLine { path: path.to_path_buf(), line, detail };
    let mut cases: Vec<GoldenCase> = Vec::new();
    for (index, raw_line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let text = std::str::from_utf8(raw_line).map_err(|e| bad(line, format!("not valid UTF-8: {e}")))?;
        if text.trim().is_empty() {
            continue;
        }
        let raw: RawCase = serde_json::from_str(text.trim()).map_err(|e| bad(line, e.to_string()))?;
        if raw.text.trim().is_empty() {
            return Err(bad(line, "the text is empty".into()));
        }
        if let Some(first) = cases.iter().find(|c| c.id == raw.id) {
            return Err(GoldenError::DuplicateId {
                path: path.to_path_buf(),
                id: raw.id,
                first: first.line,
                second: line,
            });
        }
        cases.push(GoldenCase { id: raw.id, content: Content::text(raw.text), expected: raw.expected, line });
    }
    if cases.is_empty() {
        return Err(GoldenError::Empty { path: path.to_path_buf() });
    }
    Ok(cases)
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub id: String,
    pub expected: Expected,
    pub outcome: Outcome,
    pub passed: bool,
    pub decision: Decision,
}

#[derive(Debug, Clone, Serialize)]
pub struct GoldenReport {
    pub policy: String,
    pub policy_hash: String,
    pub results: Vec<CaseResult>,
}

impl GoldenReport {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.passed).count()
    }

    pub fn failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.results.iter().filter(|r| !r.passed)
    }
}

/// Classifies every case under `policy` (`batch` cases per reasoner call) and compares outcomes.
pub async fn run_golden(
    classifier: &Classifier,
    policy: &Policy,
    cases: &[GoldenCase],
    options: &ClassifyOptions,
    batch: usize,
) -> GoldenReport {
    let mut results = Vec::with_capacity(cases.len());
    for chunk in cases.chunks(batch.max(1)) {
        let contents: Vec<Content> = chunk.iter().map(|c| c.content.clone()).collect();
        let decisions = classifier.classify_many(std::slice::from_ref(policy), &contents, options).await;
        for (case, decision) in chunk.iter().zip(decisions) {
            let outcome = decision.outcome;
            results.push(CaseResult {
                id: case.id.clone(),
                expected: case.expected,
                outcome,
                passed: outcome == case.expected.outcome(),
                decision,
            });
        }
    }
    GoldenReport { policy: policy.meta.name.clone(), policy_hash: policy.hash.to_string(), results }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(contents: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), contents).unwrap();
        file
    }

    /// Answers "1" for shouting, "0" for anything else, and nothing at all for "???".
    struct ShoutReasoner;

    #[async_trait::async_trait]
    impl crate::Reasoner for ShoutReasoner {
        fn model_id(&self) -> String {
            "shout".into()
        }

        async fn reason(&self, req: crate::ReasonRequest) -> Result<crate::ReasonOutput, crate::ReasonError> {
            let text = req.content.judged_text();
            let final_text = match text {
                "???" => None,
                _ if text == text.to_uppercase() => Some("1".to_owned()),
                _ => Some("0".to_owned()),
            };
            Ok(crate::ReasonOutput { final_text, ..Default::default() })
        }
    }

    #[tokio::test]
    async fn run_golden_passes_matching_cases_and_fails_undecided_ones() {
        let policy = Policy::parse(
            "---\nname: shout\noutput: binary\n---\n# Shout\n\n## INSTRUCTIONS\nReturn 0 or 1.\n\n\
             ## VIOLATES (1)\nAll caps.\n\n## SAFE (0)\nAnything else.\n",
        )
        .unwrap();
        let case = |id: &str, text: &str, expected| GoldenCase {
            id: id.into(),
            content: Content::text(text),
            expected,
            line: 1,
        };
        let cases = [
            case("caps", "BUY NOW", Expected::Violation),
            case("calm", "hello", Expected::Allow),
            case("wrong", "hello", Expected::Violation),
            case("unsure", "???", Expected::Allow),
        ];
        let classifier = Classifier::new(std::sync::Arc::new(ShoutReasoner));
        let report = run_golden(&classifier, &policy, &cases, &ClassifyOptions::default(), 3).await;
        assert_eq!(report.policy, "shout");
        let verdicts: Vec<(&str, bool, Outcome)> =
            report.results.iter().map(|r| (r.id.as_str(), r.passed, r.outcome)).collect();
        assert_eq!(
            verdicts,
            [
                ("caps", true, Outcome::Violation),
                ("calm", true, Outcome::Allow),
                ("wrong", false, Outcome::Allow),
                ("unsure", false, Outcome::NeedsReview),
            ]
        );
        assert_eq!(report.passed(), 2);
        assert_eq!(report.failures().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["wrong", "unsure"]);
    }

    #[test]
    fn a_byte_order_mark_does_not_break_the_first_case() {
        let file = write("\u{feff}{\"id\":\"a\",\"text\":\"x\",\"expected\":\"allow\"}\n");
        let cases = load_golden_cases(file.path()).unwrap();
        assert_eq!(cases.len(), 1);
        assert_eq!((cases[0].id.as_str(), cases[0].line), ("a", 1));
    }

    #[test]
    fn golden_file_sits_beside_the_policy() {
        assert_eq!(golden_path_for(Path::new("/p/spam.md")), PathBuf::from("/p/spam.tests.jsonl"));
    }

    #[test]
    fn reads_cases_and_rejects_bad_files_whole() {
        let file = write(
            "{\"id\":\"a\",\"text\":\"buy\",\"expected\":\"violation\"}\n\n{\"id\":\"b\",\"text\":\"hi\",\"expected\":\"allow\"}\n",
        );
        let cases = load_golden_cases(file.path()).unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[1].expected, Expected::Allow);
        assert_eq!(cases[1].line, 3);

        let file = write("{\"id\":\"a\",\"text\":\"x\",\"expected\":\"maybe\"}\n");
        let error = load_golden_cases(file.path()).unwrap_err().to_string();
        assert!(error.contains(":1:") && error.contains("maybe"), "{error}");

        let file = write(
            "{\"id\":\"a\",\"text\":\"x\",\"expected\":\"allow\"}\n{\"id\":\"a\",\"text\":\"y\",\"expected\":\"allow\"}\n",
        );
        assert!(matches!(load_golden_cases(file.path()), Err(GoldenError::DuplicateId { first: 1, second: 2, .. })));

        assert!(matches!(load_golden_cases(write("\n").path()), Err(GoldenError::Empty { .. })));
        assert!(matches!(load_golden_cases(write("\u{feff}\n").path()), Err(GoldenError::Empty { .. })));
        assert!(matches!(load_golden_cases(Path::new("/no/such.tests.jsonl")), Err(GoldenError::Read { .. })));
    }
}

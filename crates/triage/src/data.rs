//! Labelled datasets from JSONL or CSV files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::TriageError;
use crate::train::Example;

/// Field names to read; `None` tries the usual names in order.
#[derive(Debug, Clone, Default)]
pub struct DatasetFields {
    pub text: Option<String>,
    pub label: Option<String>,
    pub weight: Option<String>,
}

const TEXT_FIELDS: &[&str] = &["text", "user_input", "prompt", "content", "tweet"];
const LABEL_FIELDS: &[&str] = &["violates", "label", "toxicity", "violation"];

/// Where training items came from, recorded in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetProvenance {
    pub path: String,
    pub sha256: String,
    pub items: usize,
    pub violations: usize,
    pub text_field: String,
    pub label_field: String,
    pub weight_field: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub provenance: DatasetProvenance,
}

/// Reads a label: 0/1, true/false, or the words violation/violates/unsafe vs allow/safe/benign.
pub fn parse_label(value: &serde_json::Value) -> Option<bool> {
    match value {
        serde_json::Value::Bool(b) => Some(*b),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(1.0) => Some(true),
            Some(0.0) => Some(false),
            _ => None,
        },
        serde_json::Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "violation" | "violates" | "violating" | "unsafe" | "yes" => Some(true),
            "0" | "false" | "allow" | "allowed" | "safe" | "benign" | "no" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn pick_field(
    explicit: &Option<String>,
    candidates: &[&str],
    has: impl Fn(&str) -> bool,
    what: &str,
    path: &Path,
) -> Result<String, TriageError> {
    match explicit {
        Some(name) if has(name) => Ok(name.clone()),
        Some(name) => Err(TriageError::Dataset(format!("{}: first row has no {what} field {name:?}", path.display()))),
        None => candidates.iter().find(|c| has(c)).map(|c| c.to_string()).ok_or_else(|| {
            TriageError::Dataset(format!(
                "{}: no {what} field found (tried {}); name it with the field option",
                path.display(),
                candidates.join(", ")
            ))
        }),
    }
}

/// Loads a `.jsonl` (one object per line) or `.csv` (header row) file. Any row without a usable text or
/// label is an error naming the line: silently dropping rows would skew recall.
pub fn load_dataset(path: &Path, fields: &DatasetFields, source: usize) -> Result<Dataset, TriageError> {
    let _span = tracing::info_span!("load_dataset", path = %path.display()).entered();
    let bytes = std::fs::read(path).map_err(|e| TriageError::Io { path: PathBuf::from(path), source: e })?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let text =
        std::str::from_utf8(&bytes).map_err(|e| TriageError::Dataset(format!("{}: not UTF-8: {e}", path.display())))?;
    let is_csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let rows: Vec<(usize, serde_json::Map<String, serde_json::Value>)> = if is_csv {
        let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
        let headers =
            reader.headers().map_err(|e| TriageError::Dataset(format!("{}: CSV header: {e}", path.display())))?.clone();
        let mut rows = Vec::new();
        for (i, record) in reader.records().enumerate() {
            let record =
                record.map_err(|e| TriageError::Dataset(format!("{}: CSV record {}: {e}", path.display(), i + 1)))?;
            let map = headers
                .iter()
                .zip(record.iter())
                .map(|(h, v)| (h.to_string(), serde_json::Value::String(v.to_string())))
                .collect();
            rows.push((i + 2, map));
        }
        rows
    } else {
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(serde_json::Value::Object(map)) => rows.push((i + 1, map)),
                Ok(_) => {
                    return Err(TriageError::Dataset(format!("{}:{}: expected a JSON object", path.display(), i + 1)));
                }
                Err(e) => return Err(TriageError::Dataset(format!("{}:{}: {e}", path.display(), i + 1))),
            }
        }
        rows
    };
    let Some((_, first)) = rows.first() else {
        return Err(TriageError::Dataset(format!("{}: no rows", path.display())));
    };
    let text_field = pick_field(&fields.text, TEXT_FIELDS, |f| first.contains_key(f), "text", path)?;
    let label_field = pick_field(&fields.label, LABEL_FIELDS, |f| first.contains_key(f), "label", path)?;
    let weight_field = match &fields.weight {
        Some(w) => Some(pick_field(&fields.weight, &[], |f| first.contains_key(f), "weight", path).map(|_| w.clone())?),
        None => None,
    };
    let mut examples = Vec::with_capacity(rows.len());
    for (line, row) in &rows {
        let at = || format!("{}:{line}", path.display());
        let text = match row.get(&text_field) {
            Some(serde_json::Value::String(s)) => s.clone(),
            other => {
                return Err(TriageError::Dataset(format!("{}: field {text_field:?} is not a string: {other:?}", at())));
            }
        };
        let label = row
            .get(&label_field)
            .ok_or_else(|| TriageError::Dataset(format!("{}: missing label field {label_field:?}", at())))?;
        let violates = parse_label(label).ok_or_else(|| {
            TriageError::Dataset(format!("{}: label {label} is not 0/1/true/false/\"violation\"/\"allow\"", at()))
        })?;
        let weight = match &weight_field {
            None => 1.0,
            Some(w) => {
                let value = row.get(w);
                let parsed = match value {
                    Some(serde_json::Value::Number(n)) => n.as_f64(),
                    Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
                    None | Some(serde_json::Value::Null) => Some(1.0),
                    _ => None,
                };
                match parsed {
                    Some(x) if x.is_finite() && x >= 0.0 => x as f32,
                    _ => return Err(TriageError::Dataset(format!("{}: weight {value:?} is not a number >= 0", at()))),
                }
            }
        };
        examples.push(Example { text, violates, weight, source });
    }
    let violations = examples.iter().filter(|e| e.violates).count();
    Ok(Dataset {
        provenance: DatasetProvenance {
            path: path.display().to_string(),
            sha256,
            items: examples.len(),
            violations,
            text_field,
            label_field,
            weight_field,
        },
        examples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn reads_jsonl_and_csv_with_label_spellings() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = write(
            dir.path(),
            "a.jsonl",
            "{\"user_input\":\"hi\",\"toxicity\":0}\n\n{\"user_input\":\"bad\",\"toxicity\":1}\n{\"user_input\":\"x\",\"toxicity\":\"violation\"}\n",
        );
        let d = load_dataset(&jsonl, &DatasetFields::default(), 3).unwrap();
        assert_eq!(d.examples.len(), 3);
        assert_eq!(d.provenance.violations, 2);
        assert_eq!(d.provenance.text_field, "user_input");
        assert_eq!(d.examples[0].source, 3);
        let csv = write(dir.path(), "b.csv", "text,label,w\n\"hello, world\",allow,1\nnasty,true,5\n");
        let fields = DatasetFields { weight: Some("w".into()), ..DatasetFields::default() };
        let d = load_dataset(&csv, &fields, 0).unwrap();
        assert_eq!(d.examples[0].text, "hello, world");
        assert!(!d.examples[0].violates && d.examples[1].violates);
        assert_eq!(d.examples[1].weight, 5.0);
    }

    #[test]
    fn bad_rows_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let bad_label =
            write(dir.path(), "c.jsonl", "{\"text\":\"a\",\"violates\":0}\n{\"text\":\"b\",\"violates\":\"maybe\"}\n");
        let err = load_dataset(&bad_label, &DatasetFields::default(), 0).unwrap_err().to_string();
        assert!(err.contains("c.jsonl:2") && err.contains("maybe"), "{err}");
        let broken = write(dir.path(), "d.jsonl", "{\"text\":\"a\",\"violates\":0}\n{not json\n");
        assert!(load_dataset(&broken, &DatasetFields::default(), 0).unwrap_err().to_string().contains("d.jsonl:2"));
        let no_field = write(dir.path(), "e.jsonl", "{\"body\":\"a\",\"violates\":0}\n");
        assert!(
            load_dataset(&no_field, &DatasetFields::default(), 0).unwrap_err().to_string().contains("no text field")
        );
        assert!(load_dataset(&dir.path().join("missing.jsonl"), &DatasetFields::default(), 0).is_err());
    }
}

//! Labelled datasets from JSONL or CSV files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::TriageError;
use crate::train::Example;

/// Field names to read (`None` tries the usual names in order), and how to read labels and weights.
#[derive(Debug, Clone)]
pub struct DatasetFields {
    pub text: Option<String>,
    pub label: Option<String>,
    pub weight: Option<String>,
    /// Reads the label field through this table instead of [`parse_label`]; a value it does not list is an
    /// error naming the line. Empty: [`parse_label`].
    pub label_values: Vec<LabelValue>,
    /// Multiplies every item's weight, e.g. to down-weight an out-of-domain corpus; a per-value weight in
    /// `label_values` replaces it.
    pub weight_scale: f32,
    /// Keeps only rows for this policy where a row names one (the `policy` field `safeguard export dataset`
    /// writes): an export holds a row per decision and policy, and one item may violate one policy and not
    /// another, so another policy's label is no label for this one. Rows that name no policy are kept.
    pub policy: Option<String>,
    /// Keeps only rows labelled under this version of the policy where a row names one (the `policy_hash` field
    /// of an export): a label given under an older wording may be wrong under this one, and the model is tied
    /// to the version it is trained for. Rows that name no version are kept.
    pub policy_hash: Option<String>,
}

impl Default for DatasetFields {
    fn default() -> Self {
        DatasetFields {
            text: None,
            label: None,
            weight: None,
            label_values: Vec::new(),
            weight_scale: 1.0,
            policy: None,
            policy_hash: None,
        }
    }
}

/// The field a row names its policy in, as `safeguard export dataset` writes it.
pub const POLICY_FIELD: &str = "policy";
/// The field a row names the policy version it was labelled under, as `safeguard export dataset` writes it.
pub const POLICY_HASH_FIELD: &str = "policy_hash";

/// One value of a label field read as a training label with its own weight: how a dataset's own classes map
/// onto the policy's violation/benign, e.g. Davidson's class 1 ("offensive, not hate") as a weak violation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelValue {
    /// The field's value: a string as written (trimmed), a number or boolean in its JSON spelling (`1`, not `1.0`).
    pub value: String,
    pub violates: bool,
    /// Replaces the dataset's `weight_scale` for items with this value; 0 drops them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f32>,
}

impl std::str::FromStr for LabelValue {
    type Err = TriageError;

    /// `VALUE=LABEL[:WEIGHT]`, LABEL as [`parse_label`] reads it: `0=violation`, `1=violation:0.05`, `2=allow`.
    fn from_str(spec: &str) -> Result<Self, TriageError> {
        let bad = |why: &str| TriageError::InvalidConfig(format!("label value {spec:?}: {why} (VALUE=LABEL[:WEIGHT])"));
        let (value, rest) = spec.rsplit_once('=').ok_or_else(|| bad("no '='"))?;
        let (label, weight) = match rest.split_once(':') {
            Some((label, weight)) => (label, Some(weight)),
            None => (rest, None),
        };
        let violates = parse_label(&serde_json::Value::String(label.to_string()))
            .ok_or_else(|| bad("the label is not violation/allow, 1/0 or true/false"))?;
        let weight = match weight {
            None => None,
            Some(w) => match w.trim().parse::<f32>() {
                Ok(w) if w.is_finite() && w >= 0.0 => Some(w),
                _ => return Err(bad("the weight is not a number >= 0")),
            },
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(bad("empty value"));
        }
        Ok(LabelValue { value: value.to_string(), violates, weight })
    }
}

/// A label field's value in the spelling [`LabelValue::value`] uses; `None` for arrays, objects and null.
fn label_key(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.trim().to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Some(i.to_string()),
            // 2.0 reads as 2, so a JSON writer's choice of float does not change the class.
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => Some((f as i64).to_string()),
            _ => Some(n.to_string()),
        },
        _ => None,
    }
}

const TEXT_FIELDS: &[&str] = &["text", "user_input", "prompt", "content", "tweet"];
const LABEL_FIELDS: &[&str] = &["violates", "label", "toxicity", "violation"];
/// The per-item weight field used when none is named, if the data has it.
const WEIGHT_FIELD: &str = "weight";

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
    /// How the label field's values were read, when not by [`parse_label`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_values: Vec<LabelValue>,
    /// Multiplied into every item's weight (see [`DatasetFields::weight_scale`]).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub weight_scale: f32,
    /// Training signal only: its items set neither calibration nor thresholds, and under domain adaptation it
    /// has parameters of its own (see `FitOptions::calibration_sources`, `TrainConfig::domain_adaptation`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auxiliary: bool,
    /// Rows left out because they name another policy ([`DatasetFields::policy`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub other_policy_rows: usize,
    /// Rows left out because they were labelled under another version of the policy
    /// ([`DatasetFields::policy_hash`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub other_version_rows: usize,
    /// Rows left out because they weigh 0 (their label value maps to weight 0, `LabelValue::weight`, or their own
    /// weight field says 0): not an error, but a file that trains on fewer rows than it holds should say so.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_rows: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn one() -> f32 {
    1.0
}

fn is_one(x: &f32) -> bool {
    *x == 1.0
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
    if !(fields.weight_scale.is_finite() && fields.weight_scale > 0.0) {
        return Err(TriageError::InvalidConfig(format!("weight scale must be > 0, got {}", fields.weight_scale)));
    }
    for (i, v) in fields.label_values.iter().enumerate() {
        if fields.label_values[..i].iter().any(|w| w.value == v.value) {
            return Err(TriageError::InvalidConfig(format!("label value {:?} is mapped twice", v.value)));
        }
    }
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
            // Quoted fields may span lines, so the record number is not the line: the reader's position is.
            let record = record.map_err(|e| match e.position() {
                Some(at) => TriageError::Dataset(format!("{}:{}: {e}", path.display(), at.line())),
                None => TriageError::Dataset(format!("{}: CSV record {}: {e}", path.display(), i + 1)),
            })?;
            let line = record.position().map_or(i + 2, |at| usize::try_from(at.line()).unwrap_or(usize::MAX));
            let map = headers
                .iter()
                .zip(record.iter())
                .map(|(h, v)| (h.to_string(), serde_json::Value::String(v.to_string())))
                .collect();
            rows.push((line, map));
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
        // What `safeguard export dataset` writes: human corrections weigh more than model labels without a flag.
        // Looked for in every row: files joined with `cat` may start with rows that carry none.
        None => rows.iter().any(|(_, row)| row.contains_key(WEIGHT_FIELD)).then(|| WEIGHT_FIELD.to_string()),
    };
    let mut examples = Vec::with_capacity(rows.len());
    let mut other_policy_rows = 0;
    let mut other_version_rows = 0;
    let mut dropped_rows = 0;
    for (line, row) in &rows {
        let at = || format!("{}:{line}", path.display());
        if let (Some(wanted), Some(serde_json::Value::String(named))) = (&fields.policy, row.get(POLICY_FIELD))
            && named != wanted
        {
            other_policy_rows += 1;
            continue;
        }
        if let (Some(wanted), Some(serde_json::Value::String(named))) =
            (&fields.policy_hash, row.get(POLICY_HASH_FIELD))
            && named != wanted
        {
            other_version_rows += 1;
            continue;
        }
        let text = match row.get(&text_field) {
            Some(serde_json::Value::String(s)) => s.clone(),
            other => {
                return Err(TriageError::Dataset(format!("{}: field {text_field:?} is not a string: {other:?}", at())));
            }
        };
        let label = row
            .get(&label_field)
            .ok_or_else(|| TriageError::Dataset(format!("{}: missing label field {label_field:?}", at())))?;
        let (violates, value_weight) = if fields.label_values.is_empty() {
            let violates = parse_label(label).ok_or_else(|| {
                TriageError::Dataset(format!("{}: label {label} is not 0/1/true/false/\"violation\"/\"allow\"", at()))
            })?;
            (violates, fields.weight_scale)
        } else {
            let key = label_key(label);
            let mapped = fields.label_values.iter().find(|v| key.as_deref() == Some(v.value.as_str()));
            let Some(mapped) = mapped else {
                let known: Vec<&str> = fields.label_values.iter().map(|v| v.value.as_str()).collect();
                return Err(TriageError::Dataset(format!(
                    "{}: label {label} is none of the mapped values {}",
                    at(),
                    known.join(", ")
                )));
            };
            (mapped.violates, mapped.weight.unwrap_or(fields.weight_scale))
        };
        if value_weight == 0.0 {
            // A class mapped to weight 0 is left out, as if the file did not hold it.
            dropped_rows += 1;
            continue;
        }
        let item_weight = match &weight_field {
            None => 1.0,
            Some(w) => {
                let value = row.get(w);
                let parsed = match value {
                    Some(serde_json::Value::Number(n)) => n.as_f64(),
                    Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
                    None | Some(serde_json::Value::Null) => Some(1.0),
                    _ => None,
                };
                // Checked as the f32 it is kept in: 1e39 is a finite f64 but an infinite f32.
                match parsed.map(|x| x as f32) {
                    Some(x) if x.is_finite() && x >= 0.0 => x,
                    _ => return Err(TriageError::Dataset(format!("{}: weight {value:?} is not a number >= 0", at()))),
                }
            }
        };
        if item_weight == 0.0 {
            // Weighed nothing, an item trains nothing; kept, it would still count towards the classes found and set
            // thresholds and calibration as if it were data, and a file whose violations all weigh 0 would train a
            // model that never saw one.
            dropped_rows += 1;
            continue;
        }
        let weight = item_weight * value_weight;
        if !weight.is_finite() {
            return Err(TriageError::Dataset(format!(
                "{}: weight {item_weight} times the label's weight {value_weight} is too large to train with",
                at()
            )));
        }
        examples.push(Example { text, violates, weight, source });
    }
    if examples.is_empty() && other_version_rows > 0 {
        let wanted = fields.policy_hash.as_deref().unwrap_or_default();
        return Err(TriageError::Dataset(format!(
            "{}: all {other_version_rows} rows of this policy were labelled under other versions than {wanted} \
             (field {POLICY_HASH_FIELD:?}); label data under this version, or read them anyway (--any-policy-version)",
            path.display()
        )));
    }
    if examples.is_empty() && other_policy_rows > 0 {
        let wanted = fields.policy.as_deref().unwrap_or_default();
        return Err(TriageError::Dataset(format!(
            "{}: all {other_policy_rows} rows are labels for other policies than {wanted:?} (field {POLICY_FIELD:?})",
            path.display()
        )));
    }
    let violations = examples.iter().filter(|e| e.violates).count();
    if dropped_rows > 0 {
        tracing::info!(path = %path.display(), dropped_rows, "rows that weigh 0 left out");
    }
    Ok(Dataset {
        provenance: DatasetProvenance {
            path: path.display().to_string(),
            sha256,
            items: examples.len(),
            violations,
            text_field,
            label_field,
            weight_field,
            label_values: fields.label_values.clone(),
            weight_scale: fields.weight_scale,
            auxiliary: false,
            other_policy_rows,
            other_version_rows,
            dropped_rows,
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

    /// An export holds one row per decision and policy: training for one policy reads only its rows (and rows
    /// that name none), and finds the weight column wherever it starts.
    #[test]
    fn only_this_policys_rows_are_its_labels() {
        let dir = tempfile::tempdir().unwrap();
        let mixed = write(
            dir.path(),
            "export.jsonl",
            "{\"text\":\"you people are vermin\",\"violates\":1,\"policy\":\"hate\"}\n\
             {\"text\":\"you people are vermin\",\"violates\":0,\"policy\":\"spam\"}\n\
             {\"text\":\"hello\",\"violates\":0}\n\
             {\"text\":\"corrected\",\"violates\":1,\"policy\":\"hate\",\"weight\":5}\n",
        );
        let hate = DatasetFields { policy: Some("hate".into()), ..DatasetFields::default() };
        let d = load_dataset(&mixed, &hate, 0).unwrap();
        let rows: Vec<_> = d.examples.iter().map(|e| (e.text.as_str(), e.violates, e.weight)).collect();
        assert_eq!(rows, [("you people are vermin", true, 1.0), ("hello", false, 1.0), ("corrected", true, 5.0)]);
        assert_eq!(d.provenance.other_policy_rows, 1);
        let violence = DatasetFields { policy: Some("violence".into()), ..DatasetFields::default() };
        assert_eq!(load_dataset(&mixed, &violence, 0).unwrap().examples.len(), 1, "only the row naming no policy");
        let only_spam = write(dir.path(), "spam.jsonl", "{\"text\":\"x\",\"violates\":0,\"policy\":\"spam\"}\n");
        let refused = load_dataset(&only_spam, &hate, 0).unwrap_err().to_string();
        assert!(refused.contains("other policies"), "{refused}");
        // Without a policy to keep, every row is read.
        assert_eq!(load_dataset(&mixed, &DatasetFields::default(), 0).unwrap().examples.len(), 4);
    }

    /// A label given under an older wording of the policy is no label for this one: left out and counted, and a
    /// file of nothing but older labels is refused rather than read as empty.
    #[test]
    fn only_this_versions_rows_are_its_labels() {
        let dir = tempfile::tempdir().unwrap();
        let export = write(
            dir.path(),
            "export.jsonl",
            "{\"text\":\"buy now\",\"violates\":1,\"policy\":\"spam\",\"policy_hash\":\"sha256:old\"}\n\
             {\"text\":\"buy now\",\"violates\":0,\"policy\":\"spam\",\"policy_hash\":\"sha256:new\"}\n\
             {\"text\":\"hello\",\"violates\":0}\n",
        );
        let new = DatasetFields {
            policy: Some("spam".into()),
            policy_hash: Some("sha256:new".into()),
            ..DatasetFields::default()
        };
        let d = load_dataset(&export, &new, 0).unwrap();
        let rows: Vec<_> = d.examples.iter().map(|e| (e.text.as_str(), e.violates)).collect();
        assert_eq!(rows, [("buy now", false), ("hello", false)]);
        assert_eq!(d.provenance.other_version_rows, 1);
        let only_old = write(
            dir.path(),
            "old.jsonl",
            "{\"text\":\"x\",\"violates\":1,\"policy\":\"spam\",\"policy_hash\":\"sha256:old\"}\n",
        );
        let refused = load_dataset(&only_old, &new, 0).unwrap_err().to_string();
        assert!(refused.contains("other versions") && refused.contains("sha256:new"), "{refused}");
        // Without a version to keep, every row of the policy is read.
        let any_version = DatasetFields { policy_hash: None, ..new };
        assert_eq!(load_dataset(&export, &any_version, 0).unwrap().examples.len(), 3);
    }

    /// A weight that fits an f64 but not the f32 training keeps, or that overflows once the label's weight
    /// multiplies it, is refused where it is read, naming the line, not later by the trainer without one.
    #[test]
    fn weights_too_large_to_train_with_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let huge = write(
            dir.path(),
            "huge.jsonl",
            "{\"text\":\"a\",\"violates\":0}\n{\"text\":\"b\",\"violates\":1,\"weight\":1e39}\n",
        );
        let refused = load_dataset(&huge, &DatasetFields::default(), 0).unwrap_err().to_string();
        assert!(refused.contains("huge.jsonl:2") && refused.contains("not a number >= 0"), "{refused}");
        let large = write(dir.path(), "large.jsonl", "{\"text\":\"b\",\"violates\":1,\"weight\":3e38}\n");
        let scaled = DatasetFields { weight_scale: 10.0, ..DatasetFields::default() };
        let refused = load_dataset(&large, &scaled, 0).unwrap_err().to_string();
        assert!(refused.contains("large.jsonl:1") && refused.contains("too large"), "{refused}");
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

    /// A quoted field spanning lines shifts every later record's line: "record + 2" named the wrong one.
    #[test]
    fn csv_errors_name_the_line_the_record_starts_on() {
        let dir = tempfile::tempdir().unwrap();
        let body = "text,label\n\"two\nlines\",0\nfine,1\nbad,maybe\n";
        let bad_label = write(dir.path(), "f.csv", body);
        let err = load_dataset(&bad_label, &DatasetFields::default(), 0).unwrap_err().to_string();
        assert!(err.contains("f.csv:5:") && err.contains("maybe"), "{err}");
        let ragged = write(dir.path(), "g.csv", "text,label\n\"two\nlines\",0\nfine,1,extra\n");
        let err = load_dataset(&ragged, &DatasetFields::default(), 0).unwrap_err().to_string();
        assert!(err.contains("g.csv:4:"), "{err}");
        let d = load_dataset(
            &write(dir.path(), "h.csv", body.trim_end_matches("bad,maybe\n")),
            &DatasetFields::default(),
            0,
        )
        .unwrap();
        assert_eq!((d.examples.len(), d.examples[0].text.as_str(), d.provenance.dropped_rows), (2, "two\nlines", 0));
    }

    #[test]
    fn label_values_map_classes_to_weighted_labels_and_refuse_the_unlisted() {
        let dir = tempfile::tempdir().unwrap();
        let body = "{\"text\":\"a\",\"class\":0,\"w\":2}\n{\"text\":\"b\",\"class\":1.0}\n{\"text\":\"c\",\"class\":\"2\"}\n\
                    {\"text\":\"d\",\"class\":3}\n{\"text\":\"e\",\"class\":0,\"w\":0}\n";
        let path = write(dir.path(), "three.jsonl", body);
        let spec = |s: &str| s.parse::<LabelValue>().unwrap();
        let fields = DatasetFields {
            label: Some("class".into()),
            weight: Some("w".into()),
            label_values: vec![spec("0=violation"), spec("1=violation:0.05"), spec("2=allow"), spec("3=allow:0")],
            weight_scale: 0.5,
            ..DatasetFields::default()
        };
        let d = load_dataset(&path, &fields, 1).unwrap();
        let got: Vec<(&str, bool, f32)> = d.examples.iter().map(|e| (e.text.as_str(), e.violates, e.weight)).collect();
        // The scale applies where no per-value weight is given, times the item's own weight; weight 0 drops "d",
        // and so does an item's own weight of 0 ("e").
        assert_eq!(got, [("a", true, 1.0), ("b", true, 0.05), ("c", false, 0.5)]);
        assert_eq!((d.provenance.items, d.provenance.violations, d.provenance.weight_scale), (3, 2, 0.5));
        assert_eq!(d.provenance.dropped_rows, 2, "the weight-0 rows are counted");
        assert_eq!(d.provenance.label_values.len(), 4);

        let without_3 = DatasetFields { label_values: fields.label_values[..3].to_vec(), ..fields.clone() };
        let err = load_dataset(&path, &without_3, 1).unwrap_err().to_string();
        assert!(err.contains("three.jsonl:4") && err.contains("none of the mapped values 0, 1, 2"), "{err}");
        let twice = DatasetFields { label_values: vec![spec("0=violation"), spec("0=allow")], ..fields.clone() };
        assert!(load_dataset(&path, &twice, 1).unwrap_err().to_string().contains("mapped twice"));
        for bad in ["0", "0=maybe", "0=violation:-1", "0=allow:x", "=allow"] {
            assert!(bad.parse::<LabelValue>().is_err(), "{bad}");
        }
    }
}

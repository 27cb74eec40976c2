//! Labelled datasets: generic JSONL/CSV files with field mapping, and named adapters for the shared sets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use crate::EvalError;
use crate::predictions::jsonl_lines;

/// One labelled item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub text: String,
    /// The label being scored; `None` when the source does not know it (the item is then left out of metrics).
    pub label: Option<bool>,
    /// Further known labels (for per-category scores and multi-policy accuracy), keyed by category.
    /// A category absent here is unknown for this item, not negative.
    pub categories: BTreeMap<String, bool>,
    /// A grouping for per-group breakdowns (e.g. XSTest's prompt type).
    pub group: Option<String>,
}

/// A loaded dataset: items in file order, with unique ids.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// A readable name such as `xstest` or `openai-moderation:SH` or a file path.
    pub name: String,
    pub items: Vec<Item>,
    /// Other names that refer to a category (e.g. `self-harm` -> `SH`), lower-cased.
    pub category_aliases: BTreeMap<String, String>,
    /// Labels came one policy per row (a `safeguard export dataset` file): each item's categories are its
    /// policies' labels and `label` says whether it violates any of them.
    pub labelled_per_policy: bool,
    /// Policy -> rows left out because they were labelled under another version of it than the one asked for
    /// ([`FieldMapping::policy_versions`]).
    pub other_version_rows: BTreeMap<String, usize>,
    /// Label field -> value -> rows: the values read as safe only because they are not the positive label (a
    /// positive label and no negative labels, see [`FieldMapping::negative_labels`]). Shown to the user, so that
    /// a typo such as `usnafe` does not pass unseen as a safe label.
    pub read_as_negative: BTreeMap<String, BTreeMap<String, usize>>,
    /// Item id -> why its row has no text to judge (`data.jsonl:7: field `text` is null`). The item keeps its
    /// place and label, so it stays in the denominators: a live run counts it as a failed classification.
    pub text_errors: BTreeMap<String, String>,
    index: HashMap<String, usize>,
}

impl Dataset {
    /// Builds a dataset, refusing duplicate ids because predictions are joined on them.
    pub fn new(name: impl Into<String>, items: Vec<Item>) -> Result<Self, EvalError> {
        let name = name.into();
        let mut index = HashMap::with_capacity(items.len());
        for (position, item) in items.iter().enumerate() {
            if let Some(first) = index.insert(item.id.clone(), position) {
                return Err(EvalError::Options(format!(
                    "dataset {name}: id `{}` appears twice (items {} and {}); ids must be unique to join predictions",
                    item.id,
                    first + 1,
                    position + 1
                )));
            }
        }
        Ok(Dataset {
            name,
            items,
            category_aliases: BTreeMap::new(),
            labelled_per_policy: false,
            other_version_rows: BTreeMap::new(),
            read_as_negative: BTreeMap::new(),
            text_errors: BTreeMap::new(),
            index,
        })
    }

    /// Scores one policy of a dataset labelled per policy: keeps the items labelled for `policy` and makes that
    /// label the one scored. A dataset labelled as a whole is left as it is.
    pub fn focus_on_policy(&mut self, policy: &str) -> Result<(), EvalError> {
        self.focus_on_policies(&[policy])
    }

    /// [`focus_on_policy`](Self::focus_on_policy) for a run of several policies: an item violates when one of
    /// them says so and is safe only when all of them do; an item some of them left unlabelled (and none called
    /// violating) is left out. Labels of policies not run never count: a violation of one of those is no miss.
    pub fn focus_on_policies(&mut self, policies: &[&str]) -> Result<(), EvalError> {
        if !self.labelled_per_policy {
            return Ok(());
        }
        let mut categories = Vec::new();
        for policy in policies {
            let Some(category) = self.category_for_policy(policy) else {
                return Err(EvalError::Options(format!(
                    "dataset {} holds labels for policies {}, none for `{policy}`",
                    self.name,
                    self.category_keys().join(", ")
                )));
            };
            categories.push(category);
        }
        self.items.retain_mut(|item| {
            let labels: Vec<Option<bool>> =
                categories.iter().map(|category| item.categories.get(category).copied()).collect();
            item.label = if labels.contains(&Some(true)) {
                Some(true)
            } else if labels.iter().all(Option::is_some) {
                Some(false)
            } else {
                None
            };
            item.label.is_some()
        });
        self.index = self.items.iter().enumerate().map(|(position, item)| (item.id.clone(), position)).collect();
        let index = &self.index;
        self.text_errors.retain(|id, _| index.contains_key(id));
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&Item> {
        self.index.get(id).map(|&i| &self.items[i])
    }

    pub fn position(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Keeps the first `limit` items (for quick live runs).
    pub fn truncate(&mut self, limit: usize) {
        for item in self.items.iter().skip(limit) {
            self.index.remove(&item.id);
            self.text_errors.remove(&item.id);
        }
        self.items.truncate(limit);
    }

    /// Keeps only the items with a known label; returns how many were left out. For runs that compare with the
    /// labels, where an unlabelled item would be judged and then dropped unseen.
    pub fn keep_labelled(&mut self) -> usize {
        let before = self.items.len();
        for item in self.items.iter().filter(|item| item.label.is_none()) {
            self.text_errors.remove(&item.id);
        }
        self.items.retain(|item| item.label.is_some());
        self.index = self.items.iter().enumerate().map(|(position, item)| (item.id.clone(), position)).collect();
        before - self.items.len()
    }

    /// All category keys that occur in the dataset.
    pub fn category_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.items.iter().flat_map(|i| i.categories.keys().cloned()).collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// The dataset category a policy name refers to: the category itself (case-insensitive) or an alias.
    pub fn category_for_policy(&self, policy: &str) -> Option<String> {
        let wanted = policy.trim().to_lowercase();
        if let Some(key) = self.category_aliases.get(&wanted) {
            return Some(key.clone());
        }
        self.category_keys().into_iter().find(|key| key.to_lowercase() == wanted)
    }
}

/// How to read a generic JSONL or CSV file. Unset fields fall back to common names.
#[derive(Debug, Clone, Default)]
pub struct FieldMapping {
    /// Default: the first of `text`, `prompt`, `content` present.
    pub text_field: Option<String>,
    /// Default: the first of `violates`, `label` present.
    pub label_field: Option<String>,
    /// Default: `id`.
    pub id_field: Option<String>,
    /// A label value meaning "violating" (case-insensitive). Without it labels must be 0/1, true/false or
    /// yes/no.
    pub positive_label: Option<String>,
    /// With a positive label: the values meaning "safe". Any value that is neither is then an error naming its
    /// line. Left empty, every other value is read as safe, and the values so read are counted in
    /// [`Dataset::read_as_negative`].
    pub negative_labels: Vec<String>,
    /// A field to break metrics down by.
    pub group_field: Option<String>,
    /// Extra label fields, each scored as its own category (multi-policy data).
    pub category_fields: Vec<String>,
    /// Policy name -> the version (`sha256:…` hash) whose labels count. In a file labelled per policy, a row for
    /// a listed policy whose `policy_hash` names another version is left out: a label given under an older
    /// wording may be wrong under this one. Rows that name no version, and rows of unlisted policies, are kept.
    /// Empty: every row counts.
    pub policy_versions: BTreeMap<String, String>,
}

const TEXT_FIELDS: [&str; 3] = ["text", "prompt", "content"];
const LABEL_FIELDS: [&str; 2] = ["violates", "label"];

/// The eight OpenAI moderation 2022 category keys with their names.
pub const OPENAI_CATEGORIES: [(&str, &str); 8] = [
    ("S", "sexual"),
    ("H", "hate"),
    ("V", "violence"),
    ("HR", "harassment"),
    ("SH", "self-harm"),
    ("S3", "sexual/minors"),
    ("H2", "hate/threatening"),
    ("V2", "violence/graphic"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToxicChatLabel {
    Toxicity,
    Jailbreaking,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DavidsonLabel {
    /// Majority class "hate speech".
    Hate,
    /// Majority class "offensive language" (not hate).
    Offensive,
    /// Hate or offensive.
    Any,
}

/// Where a dataset comes from: a file, or one of the shared sets by name.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSpec {
    File(PathBuf),
    /// `openai-moderation:<S|H|V|HR|SH|S3|H2|V2|any>`; category names such as `self-harm` work too.
    OpenAiModeration {
        category: Option<&'static str>,
    },
    /// `toxicchat:<toxicity|jailbreaking>[:test|train]`, test by default.
    ToxicChat {
        label: ToxicChatLabel,
        split: Split,
    },
    /// `xstest`.
    XsTest,
    /// `davidson:<hate|offensive|any>`.
    Davidson {
        label: DavidsonLabel,
    },
}

impl FromStr for DatasetSpec {
    type Err = EvalError;

    fn from_str(spec: &str) -> Result<Self, EvalError> {
        let bad = |message: String| EvalError::Spec { spec: spec.to_string(), message };
        let mut parts = spec.split(':');
        let head = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        match head {
            "openai-moderation" => {
                let [category] = args[..] else {
                    return Err(bad("expected openai-moderation:<S|H|V|HR|SH|S3|H2|V2|any>".into()));
                };
                if category.eq_ignore_ascii_case("any") {
                    return Ok(DatasetSpec::OpenAiModeration { category: None });
                }
                let wanted = category.to_lowercase().replace(['_', '-'], "");
                OPENAI_CATEGORIES
                    .iter()
                    .find(|(key, name)| {
                        key.to_lowercase() == wanted || name.replace(['/', '-'], "") == wanted.replace('/', "")
                    })
                    .map(|(key, _)| DatasetSpec::OpenAiModeration { category: Some(key) })
                    .ok_or_else(|| {
                        bad(format!(
                            "unknown category `{category}`; use any or one of {}",
                            OPENAI_CATEGORIES.iter().map(|(k, n)| format!("{k} ({n})")).collect::<Vec<_>>().join(", ")
                        ))
                    })
            }
            "toxicchat" => {
                let (label, split) = match args[..] {
                    [label] => (label, "test"),
                    [label, split] => (label, split),
                    _ => {
                        return Err(bad("expected toxicchat:<toxicity|jailbreaking>[:test|train]".into()));
                    }
                };
                let label = match label {
                    "toxicity" => ToxicChatLabel::Toxicity,
                    "jailbreaking" | "jailbreak" => ToxicChatLabel::Jailbreaking,
                    other => {
                        return Err(bad(format!("unknown label `{other}`; use toxicity or jailbreaking")));
                    }
                };
                let split = match split {
                    "test" => Split::Test,
                    "train" => Split::Train,
                    other => {
                        return Err(bad(format!("unknown split `{other}`; use test or train")));
                    }
                };
                Ok(DatasetSpec::ToxicChat { label, split })
            }
            "xstest" => {
                if !args.is_empty() {
                    return Err(bad("xstest takes no arguments".into()));
                }
                Ok(DatasetSpec::XsTest)
            }
            "davidson" => {
                let label = match args[..] {
                    ["hate"] => DavidsonLabel::Hate,
                    ["offensive"] => DavidsonLabel::Offensive,
                    ["any"] => DavidsonLabel::Any,
                    _ => return Err(bad("expected davidson:<hate|offensive|any>".into())),
                };
                Ok(DatasetSpec::Davidson { label })
            }
            _ => Ok(DatasetSpec::File(PathBuf::from(spec))),
        }
    }
}

impl DatasetSpec {
    /// Loads the dataset. Named adapters read from `data_dir` (the shared data folder); `mapping` applies to files.
    #[tracing::instrument(skip(mapping), fields(spec = ?self))]
    pub fn load(&self, data_dir: &Path, mapping: &FieldMapping) -> Result<Dataset, EvalError> {
        match self {
            DatasetSpec::File(path) => load_file(path, mapping),
            DatasetSpec::OpenAiModeration { category } => load_openai_moderation(data_dir, *category),
            DatasetSpec::ToxicChat { label, split } => load_toxicchat(data_dir, *label, *split),
            DatasetSpec::XsTest => load_xstest(data_dir),
            DatasetSpec::Davidson { label } => load_davidson(data_dir, *label),
        }
    }
}

/// Reads a JSONL (`.jsonl`, `.ndjson`, `.json`) or CSV (`.csv`, `.tsv`) file.
pub fn load_file(path: &Path, mapping: &FieldMapping) -> Result<Dataset, EvalError> {
    check_label_values(mapping)?;
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_lowercase();
    let rows = match extension.as_str() {
        "csv" => read_csv_rows(path, b',')?,
        "tsv" => read_csv_rows(path, b'\t')?,
        _ => read_jsonl_rows(path)?,
    };
    let per_policy = mapping.category_fields.is_empty()
        && rows.first().is_some_and(|row| matches!(row.value.get(POLICY_FIELD), Some(Value::String(_))));
    if !per_policy {
        let read = rows_to_items(path, &rows, mapping)?;
        let mut dataset = Dataset::new(path.display().to_string(), read.items)?;
        dataset.read_as_negative = read.read_as_negative;
        dataset.text_errors = read.text_errors;
        return Ok(dataset);
    }
    let (rows, other_version_rows) = keep_policy_versions(path, rows, &mapping.policy_versions)?;
    let read = rows_to_items(path, &rows, mapping)?;
    let mut dataset = Dataset::new(path.display().to_string(), merge_policy_rows(path, &rows, read.items)?)?;
    dataset.labelled_per_policy = true;
    dataset.other_version_rows = other_version_rows;
    dataset.read_as_negative = read.read_as_negative;
    dataset.text_errors = read.text_errors;
    Ok(dataset)
}

/// Refuses negative labels that cannot mean anything: without a positive label, labels are 0/1 and the like.
fn check_label_values(mapping: &FieldMapping) -> Result<(), EvalError> {
    if mapping.negative_labels.is_empty() {
        return Ok(());
    }
    let Some(positive) = mapping.positive_label.as_deref() else {
        return Err(EvalError::Options("--negative-label needs --positive-label".into()));
    };
    if let Some(both) = mapping.negative_labels.iter().find(|n| n.trim().eq_ignore_ascii_case(positive.trim())) {
        return Err(EvalError::Options(format!("label `{both}` is given as both positive and negative")));
    }
    Ok(())
}

/// The field naming the policy a row's label is for, as `safeguard export dataset` writes it.
pub const POLICY_FIELD: &str = "policy";
/// The field naming the policy version a row was labelled under, as `safeguard export dataset` writes it.
pub const POLICY_HASH_FIELD: &str = "policy_hash";

/// Leaves out the rows of a policy in `versions` labelled under another version of it, before they are read as
/// labels (two versions may label one item both ways). Returns the rows kept and, per policy, how many were not.
/// A policy that loses every row is an error: scoring it would quietly score the other policies' labels only.
fn keep_policy_versions(
    path: &Path,
    rows: Vec<Row>,
    versions: &BTreeMap<String, String>,
) -> Result<(Vec<Row>, BTreeMap<String, usize>), EvalError> {
    if versions.is_empty() {
        return Ok((rows, BTreeMap::new()));
    }
    // Policy names are matched as `focus_on_policy` matches them: trimmed, case-insensitively.
    let wanted: HashMap<String, (&str, &str)> =
        versions.iter().map(|(name, hash)| (name.trim().to_lowercase(), (name.as_str(), hash.as_str()))).collect();
    let mut kept_per_policy: HashMap<&str, usize> = HashMap::new();
    let mut left_out: BTreeMap<String, usize> = BTreeMap::new();
    let mut kept = Vec::with_capacity(rows.len());
    for row in rows {
        let policy = match row.value.get(POLICY_FIELD) {
            Some(Value::String(name)) => wanted.get(&name.trim().to_lowercase()).copied(),
            _ => None,
        };
        if let Some((name, hash)) = policy {
            if let Some(Value::String(labelled_under)) = row.value.get(POLICY_HASH_FIELD)
                && labelled_under.trim() != hash
            {
                *left_out.entry(name.to_string()).or_default() += 1;
                continue;
            }
            *kept_per_policy.entry(name).or_default() += 1;
        }
        kept.push(row);
    }
    for (name, &count) in &left_out {
        if !kept_per_policy.contains_key(name.as_str()) {
            let hash = versions.get(name).map(String::as_str).unwrap_or_default();
            return Err(EvalError::Options(format!(
                "{}: all {count} rows for policy `{name}` were labelled under other versions than {hash} \
                 (field `{POLICY_HASH_FIELD}`); label data under this version, or read them anyway \
                 (--any-policy-version)",
                path.display()
            )));
        }
    }
    Ok((kept, left_out))
}

/// Folds rows that each label one policy of an item into one item per id, its categories keyed by policy. An item
/// violates if any of its policies says so, and is safe only when every policy of the file says it is.
fn merge_policy_rows(path: &Path, rows: &[Row], items: Vec<Item>) -> Result<Vec<Item>, EvalError> {
    let data_error = |line: usize, message: String| EvalError::Data { path: path.to_path_buf(), line, message };
    let mut merged: Vec<Item> = Vec::new();
    let mut first_line: Vec<usize> = Vec::new();
    let mut position: HashMap<String, usize> = HashMap::new();
    let mut policies = BTreeSet::new();
    for (row, item) in rows.iter().zip(items) {
        let policy = match row.value.get(POLICY_FIELD) {
            Some(Value::String(name)) if !name.trim().is_empty() => name.trim().to_string(),
            _ => {
                return Err(data_error(
                    row.line,
                    format!("field `{POLICY_FIELD}` must name a policy, as on the file's first row"),
                ));
            }
        };
        policies.insert(policy.clone());
        let Some(&at) = position.get(&item.id) else {
            position.insert(item.id.clone(), merged.len());
            first_line.push(row.line);
            let mut item = item;
            item.categories = item.label.map(|label| (policy, label)).into_iter().collect();
            merged.push(item);
            continue;
        };
        let earlier = &mut merged[at];
        if earlier.text != item.text {
            return Err(data_error(
                row.line,
                format!("id `{}` has another text than on line {}", item.id, first_line[at]),
            ));
        }
        let Some(label) = item.label else { continue };
        if let Some(&known) = earlier.categories.get(&policy)
            && known != label
        {
            return Err(data_error(
                row.line,
                format!("id `{}` is labelled both ways for policy `{policy}` (see line {})", item.id, first_line[at]),
            ));
        }
        earlier.categories.insert(policy, label);
    }
    for item in &mut merged {
        item.label = if item.categories.values().any(|&violates| violates) {
            Some(true)
        } else if item.categories.len() == policies.len() {
            Some(false)
        } else {
            None
        };
    }
    Ok(merged)
}

/// A row with the line it started on.
struct Row {
    line: usize,
    value: Value,
}

fn read_jsonl_rows(path: &Path) -> Result<Vec<Row>, EvalError> {
    let mut rows = Vec::new();
    for line in jsonl_lines(path)? {
        let (line_number, line) = line?;
        let value: Value = serde_json::from_str(&line).map_err(|err| EvalError::Data {
            path: path.to_path_buf(),
            line: line_number,
            message: format!("not valid JSON: {err}"),
        })?;
        if !value.is_object() {
            return Err(EvalError::Data {
                path: path.to_path_buf(),
                line: line_number,
                message: "expected a JSON object per line".into(),
            });
        }
        rows.push(Row { line: line_number, value });
    }
    Ok(rows)
}

fn read_csv_rows(path: &Path, delimiter: u8) -> Result<Vec<Row>, EvalError> {
    let file = File::open(path).map_err(|source| EvalError::Io { path: path.to_path_buf(), source })?;
    let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).flexible(false).from_reader(file);
    let headers = reader
        .headers()
        .map_err(|err| EvalError::Data {
            path: path.to_path_buf(),
            line: 1,
            message: format!("bad CSV header: {err}"),
        })?
        .clone();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|err| EvalError::Data {
            path: path.to_path_buf(),
            line: err.position().map(|p| p.line() as usize).unwrap_or(0),
            message: format!("bad CSV record: {err}"),
        })?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let object: serde_json::Map<String, Value> = headers
            .iter()
            .zip(record.iter())
            .map(|(name, field)| {
                // CSV cannot say "no value" except by leaving the cell empty.
                let value = if field.is_empty() { Value::Null } else { Value::String(field.to_string()) };
                (name.to_string(), value)
            })
            .collect();
        rows.push(Row { line, value: Value::Object(object) });
    }
    Ok(rows)
}

/// Looks up `name` in a row; a dotted name (`labels.S`) walks into nested objects when no field has that exact name.
fn field<'a>(row: &'a Value, name: &str) -> Option<&'a Value> {
    if let Some(value) = row.get(name) {
        return Some(value);
    }
    let mut current = row;
    for part in name.split('.') {
        current = current.get(part)?;
    }
    Some(current)
}

fn choose_field(rows: &[Row], explicit: Option<&str>, candidates: &[&str]) -> Option<String> {
    if let Some(name) = explicit {
        return Some(name.to_string());
    }
    let first = rows.first()?;
    candidates.iter().find(|name| first.value.get(**name).is_some()).map(|name| name.to_string())
}

fn available_fields(row: &Value) -> String {
    row.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default()
}

/// The items of a file's rows, with what was noticed on the way (see the fields of the same names on [`Dataset`]).
#[derive(Default)]
struct ReadRows {
    items: Vec<Item>,
    read_as_negative: BTreeMap<String, BTreeMap<String, usize>>,
    text_errors: BTreeMap<String, String>,
}

fn rows_to_items(path: &Path, rows: &[Row], mapping: &FieldMapping) -> Result<ReadRows, EvalError> {
    let Some(first) = rows.first() else {
        return Ok(ReadRows::default());
    };
    let data_error = |line: usize, message: String| EvalError::Data { path: path.to_path_buf(), line, message };
    let text_field = choose_field(rows, mapping.text_field.as_deref(), &TEXT_FIELDS).ok_or_else(|| {
        data_error(
            first.line,
            format!(
                "no text field (tried {}); pass --text-field; fields here: {}",
                TEXT_FIELDS.join(", "),
                available_fields(&first.value)
            ),
        )
    })?;
    let label_field = choose_field(rows, mapping.label_field.as_deref(), &LABEL_FIELDS).ok_or_else(|| {
        data_error(
            first.line,
            format!(
                "no label field (tried {}); pass --label-field; fields here: {}",
                LABEL_FIELDS.join(", "),
                available_fields(&first.value)
            ),
        )
    })?;
    let id_field = mapping.id_field.clone().unwrap_or_else(|| "id".to_string());
    let positive = mapping.positive_label.as_deref();
    let negatives = mapping.negative_labels.as_slice();

    let mut read_as_negative: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut read_label = |name: &str, raw: &Value, line: usize| -> Result<Option<bool>, EvalError> {
        let label = parse_label(raw, positive, negatives)
            .map_err(|message| data_error(line, format!("field `{name}`: {message}")))?;
        if label == Some(false)
            && positive.is_some()
            && negatives.is_empty()
            && let Some(text) = label_text(raw)
        {
            *read_as_negative.entry(name.to_string()).or_default().entry(text).or_default() += 1;
        }
        Ok(label)
    };
    let mut items = Vec::with_capacity(rows.len());
    let mut text_errors = BTreeMap::new();
    for row in rows {
        let missing = |name: &str, flag: &str| {
            data_error(
                row.line,
                format!("missing field `{name}` (set {flag}); fields here: {}", available_fields(&row.value)),
            )
        };
        let id = match field(&row.value, &id_field) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(other) if !other.is_null() && !other.is_string() => {
                return Err(data_error(row.line, format!("id field `{id_field}` must be a string or number")));
            }
            _ => return Err(missing(&id_field, "--id-field")),
        };
        // A row without usable text is not an empty message: judging "" would score the model on nothing. It is
        // kept (with its label, so it stays in the denominators) and marked, as classify marks such an input line.
        let (text, text_problem) = match field(&row.value, &text_field) {
            Some(Value::String(s)) if !s.trim().is_empty() => (s.clone(), None),
            Some(Value::String(_) | Value::Null) => (String::new(), Some("is empty or null".to_string())),
            Some(other) => (String::new(), Some(format!("must be a string, found {}", json_kind(other)))),
            None => return Err(missing(&text_field, "--text-field")),
        };
        if let Some(problem) = text_problem {
            text_errors.entry(id.clone()).or_insert_with(|| {
                format!("{}:{}: field `{text_field}` {problem}; the row has no text to judge", path.display(), row.line)
            });
        }
        let raw_label = field(&row.value, &label_field).ok_or_else(|| missing(&label_field, "--label-field"))?;
        let label = read_label(&label_field, raw_label, row.line)?;
        let mut categories = BTreeMap::new();
        for category in &mapping.category_fields {
            let raw = field(&row.value, category).ok_or_else(|| missing(category, "--category-field"))?;
            if let Some(value) = read_label(category, raw, row.line)? {
                categories.insert(category.clone(), value);
            }
        }
        let group = mapping.group_field.as_ref().and_then(|name| match field(&row.value, name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        });
        items.push(Item { id, text, label, categories, group });
    }
    Ok(ReadRows { items, read_as_negative, text_errors })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A label value as text, trimmed; `None` for null or an empty value, or a value no label can be.
fn label_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

/// Reads one label. `Ok(None)` for null or empty (unknown); an error names the value and what was expected.
///
/// With `positive_label`, that value (case-insensitive) is a violation. A value in `negative_labels` is safe; any
/// other value is safe too when `negative_labels` is empty (one label against the rest), and an error when it is
/// not.
pub fn parse_label(
    value: &Value,
    positive_label: Option<&str>,
    negative_labels: &[String],
) -> Result<Option<bool>, String> {
    if let Value::Bool(b) = value
        && positive_label.is_none()
    {
        return Ok(Some(*b));
    }
    if matches!(value, Value::Array(_) | Value::Object(_)) {
        return Err(format!("label must be a string, number or boolean, got {value}"));
    }
    let Some(text) = label_text(value) else {
        return Ok(None);
    };
    if let Some(positive) = positive_label {
        if text.eq_ignore_ascii_case(positive.trim()) {
            return Ok(Some(true));
        }
        if negative_labels.is_empty() || negative_labels.iter().any(|n| text.eq_ignore_ascii_case(n.trim())) {
            return Ok(Some(false));
        }
        return Err(format!(
            "bad label `{text}`: neither the positive label `{}` nor a negative one ({})",
            positive.trim(),
            negative_labels.iter().map(|n| format!("`{}`", n.trim())).collect::<Vec<_>>().join(", ")
        ));
    }
    match text.to_lowercase().as_str() {
        "1" | "1.0" | "true" | "yes" => Ok(Some(true)),
        "0" | "0.0" | "false" | "no" => Ok(Some(false)),
        _ => Err(format!(
            "bad label `{text}` (expected 0/1, true/false or yes/no; use --positive-label to map other values)"
        )),
    }
}

fn shared_file(data_dir: &Path, folder: &str, file: &str) -> Result<PathBuf, EvalError> {
    let path = data_dir.join(folder).join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(EvalError::Io {
            path: path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "shared dataset file not found (set --data-dir to the folder holding the shared sets)",
            ),
        })
    }
}

fn int_field(row: &Row, path: &Path, name: &str) -> Result<i64, EvalError> {
    let value = row.value.get(name);
    value.and_then(Value::as_i64).ok_or_else(|| EvalError::Data {
        path: path.to_path_buf(),
        line: row.line,
        message: match value {
            None => format!("missing integer field `{name}`"),
            Some(other) => format!("field `{name}` must be an integer, got {other}"),
        },
    })
}

/// A 0/1 label of a shared set. Any other value is an error: read as "not 1", a changed or corrupt file would
/// quietly turn into negatives.
fn binary_field(row: &Row, path: &Path, name: &str) -> Result<bool, EvalError> {
    match int_field(row, path, name)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(EvalError::Data {
            path: path.to_path_buf(),
            line: row.line,
            message: format!("field `{name}` must be 0 or 1, got {other}"),
        }),
    }
}

fn string_field(row: &Row, path: &Path, name: &str) -> Result<String, EvalError> {
    row.value.get(name).and_then(Value::as_str).map(str::to_string).ok_or_else(|| EvalError::Data {
        path: path.to_path_buf(),
        line: row.line,
        message: format!("missing string field `{name}`"),
    })
}

/// OpenAI moderation 2022 from the derived `binary.jsonl`, whose ids (`oai-N`) are what classify runs use.
/// A missing category key means the label is unknown, so such items drop out of that category's scores.
fn load_openai_moderation(data_dir: &Path, category: Option<&'static str>) -> Result<Dataset, EvalError> {
    let path = shared_file(data_dir, "openai-moderation-2022", "binary.jsonl")?;
    let rows = read_jsonl_rows(&path)?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut categories = BTreeMap::new();
        if let Some(labels) = row.value.get("labels").and_then(Value::as_object) {
            for (key, value) in labels {
                let known = match value {
                    Value::Null => continue,
                    Value::Number(n) if n.as_i64() == Some(0) => false,
                    Value::Number(n) if n.as_i64() == Some(1) => true,
                    other => {
                        return Err(EvalError::Data {
                            path: path.clone(),
                            line: row.line,
                            message: format!("field `labels.{key}` must be 0, 1 or null, got {other}"),
                        });
                    }
                };
                categories.insert(key.clone(), known);
            }
        }
        let label = match category {
            // README: any present category = 1; items with no known positive are negatives (the simple choice).
            None => Some(binary_field(row, &path, "violates")?),
            Some(key) => categories.get(key).copied(),
        };
        items.push(Item {
            id: string_field(row, &path, "id")?,
            text: string_field(row, &path, "text")?,
            label,
            categories,
            group: None,
        });
    }
    let name = format!("openai-moderation:{}", category.unwrap_or("any"));
    let mut dataset = Dataset::new(name, items)?;
    for (key, long_name) in OPENAI_CATEGORIES {
        dataset.category_aliases.insert(long_name.to_string(), key.to_string());
        dataset.category_aliases.insert(long_name.replace('/', "-"), key.to_string());
        dataset.category_aliases.insert(long_name.replace('/', "_"), key.to_string());
    }
    Ok(dataset)
}

fn load_toxicchat(data_dir: &Path, label: ToxicChatLabel, split: Split) -> Result<Dataset, EvalError> {
    let (file, split_name) = match split {
        Split::Test => ("toxicchat0124_test_human.jsonl", "test"),
        Split::Train => ("toxicchat0124_train_human.jsonl", "train"),
    };
    let path = shared_file(data_dir, "toxicchat-0124", file)?;
    let rows = read_jsonl_rows(&path)?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let toxicity = binary_field(row, &path, "toxicity")?;
        let jailbreaking = binary_field(row, &path, "jailbreaking")?;
        items.push(Item {
            id: string_field(row, &path, "conv_id")?,
            text: string_field(row, &path, "user_input")?,
            label: Some(match label {
                ToxicChatLabel::Toxicity => toxicity,
                ToxicChatLabel::Jailbreaking => jailbreaking,
            }),
            categories: BTreeMap::from([
                ("toxicity".to_string(), toxicity),
                ("jailbreaking".to_string(), jailbreaking),
            ]),
            group: None,
        });
    }
    let label_name = match label {
        ToxicChatLabel::Toxicity => "toxicity",
        ToxicChatLabel::Jailbreaking => "jailbreaking",
    };
    Dataset::new(format!("toxicchat:{label_name}:{split_name}"), items)
}

/// XSTest from `binary.jsonl` (ids `xstest-N`); the prompt type is the group, so the safe-prompt types show
/// their false-positive rates one by one.
fn load_xstest(data_dir: &Path) -> Result<Dataset, EvalError> {
    let path = shared_file(data_dir, "xstest", "binary.jsonl")?;
    let rows = read_jsonl_rows(&path)?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        items.push(Item {
            id: string_field(row, &path, "id")?,
            text: string_field(row, &path, "text")?,
            label: Some(binary_field(row, &path, "violates")?),
            categories: BTreeMap::new(),
            group: row.value.get("type").and_then(Value::as_str).map(str::to_string),
        });
    }
    Dataset::new("xstest", items)
}

/// Davidson et al. from `binary.jsonl`: `class` 0 = hate, 1 = offensive, 2 = neither.
fn load_davidson(data_dir: &Path, label: DavidsonLabel) -> Result<Dataset, EvalError> {
    let path = shared_file(data_dir, "davidson-hate-offensive", "binary.jsonl")?;
    let rows = read_jsonl_rows(&path)?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let (hate, offensive) = match int_field(row, &path, "class")? {
            0 => (true, false),
            1 => (false, true),
            2 => (false, false),
            other => {
                return Err(EvalError::Data {
                    path: path.clone(),
                    line: row.line,
                    message: format!("field `class` must be 0 (hate), 1 (offensive) or 2 (neither), got {other}"),
                });
            }
        };
        items.push(Item {
            id: string_field(row, &path, "id")?,
            text: string_field(row, &path, "text")?,
            label: Some(match label {
                DavidsonLabel::Hate => hate,
                DavidsonLabel::Offensive => offensive,
                DavidsonLabel::Any => hate || offensive,
            }),
            categories: BTreeMap::from([("hate".to_string(), hate), ("offensive".to_string(), offensive)]),
            group: None,
        });
    }
    let label_name = match label {
        DavidsonLabel::Hate => "hate",
        DavidsonLabel::Offensive => "offensive",
        DavidsonLabel::Any => "any",
    };
    Dataset::new(format!("davidson:{label_name}"), items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_parse_numbers_bools_and_strings() {
        assert_eq!(parse_label(&json!(1), None, &[]), Ok(Some(true)));
        assert_eq!(parse_label(&json!(0), None, &[]), Ok(Some(false)));
        assert_eq!(parse_label(&json!(true), None, &[]), Ok(Some(true)));
        assert_eq!(parse_label(&json!("False"), None, &[]), Ok(Some(false)));
        assert_eq!(parse_label(&json!(" yes "), None, &[]), Ok(Some(true)));
        assert_eq!(parse_label(&json!(null), None, &[]), Ok(None));
        assert_eq!(parse_label(&json!(""), None, &[]), Ok(None));
        assert!(parse_label(&json!("unsafe"), None, &[]).unwrap_err().contains("--positive-label"));
        assert!(parse_label(&json!(2), None, &[]).is_err());
        assert!(parse_label(&json!(["x"]), Some("x"), &[]).is_err());
        assert_eq!(parse_label(&json!("unsafe"), Some("unsafe"), &[]), Ok(Some(true)));
        assert_eq!(parse_label(&json!("safe"), Some("unsafe"), &[]), Ok(Some(false)));
        assert_eq!(parse_label(&json!(true), Some("true"), &[]), Ok(Some(true)));
    }

    #[test]
    fn negative_labels_refuse_any_other_value() {
        let negatives = ["safe".to_string(), "Benign".to_string()];
        assert_eq!(parse_label(&json!("UNSAFE"), Some("unsafe"), &negatives), Ok(Some(true)));
        assert_eq!(parse_label(&json!(" safe "), Some("unsafe"), &negatives), Ok(Some(false)));
        assert_eq!(parse_label(&json!("benign"), Some("unsafe"), &negatives), Ok(Some(false)));
        assert_eq!(parse_label(&json!(null), Some("unsafe"), &negatives), Ok(None));
        let error = parse_label(&json!("usnafe"), Some("unsafe"), &negatives).unwrap_err();
        assert!(error.contains("`usnafe`") && error.contains("`safe`, `Benign`"), "{error}");
    }

    #[test]
    fn specs_parse_adapters_and_paths() {
        assert_eq!(
            "openai-moderation:SH".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::OpenAiModeration { category: Some("SH") }
        );
        assert_eq!(
            "openai-moderation:self-harm".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::OpenAiModeration { category: Some("SH") }
        );
        assert_eq!(
            "openai-moderation:hate/threatening".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::OpenAiModeration { category: Some("H2") }
        );
        assert_eq!(
            "openai-moderation:any".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::OpenAiModeration { category: None }
        );
        assert!("openai-moderation:XX".parse::<DatasetSpec>().is_err());
        assert_eq!(
            "toxicchat:jailbreaking:train".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::ToxicChat { label: ToxicChatLabel::Jailbreaking, split: Split::Train }
        );
        assert_eq!(
            "toxicchat:toxicity".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::ToxicChat { label: ToxicChatLabel::Toxicity, split: Split::Test }
        );
        assert!("toxicchat:toxicity:dev".parse::<DatasetSpec>().is_err());
        assert_eq!("davidson:any".parse::<DatasetSpec>().unwrap(), DatasetSpec::Davidson { label: DavidsonLabel::Any });
        assert_eq!("data/x.jsonl".parse::<DatasetSpec>().unwrap(), DatasetSpec::File("data/x.jsonl".into()));
    }
}

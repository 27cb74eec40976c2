//! BERT WordPiece tokenization with the semantics of Hugging Face `tokenizers`' `BertNormalizer`,
//! `BertPreTokenizer`, `WordPiece` model and the `[CLS] … [SEP]` template, so ids match what the
//! encoder was trained on. Written here because the `tokenizers` crate is far heavier than this job.

use std::collections::HashMap;
use std::path::Path;

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

use crate::error::{EmbedError, Result};

/// Normalizer switches, as in tokenizer.json's `BertNormalizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormalizerOptions {
    pub clean_text: bool,
    pub handle_chinese_chars: bool,
    /// `None` follows `lowercase`, exactly as HF does (uncased BERT strips accents).
    pub strip_accents: Option<bool>,
    pub lowercase: bool,
}

impl Default for NormalizerOptions {
    fn default() -> Self {
        NormalizerOptions { clean_text: true, handle_chinese_chars: true, strip_accents: None, lowercase: true }
    }
}

#[derive(Debug, Clone)]
pub struct WordPieceTokenizer {
    vocab: HashMap<String, u32>,
    vocab_len: usize,
    normalizer: NormalizerOptions,
    continuing_prefix: String,
    max_chars_per_word: usize,
    /// Special tokens matched verbatim in raw input before normalization (HF's added vocabulary),
    /// leftmost-longest as HF's matcher does.
    verbatim_specials: Vec<(String, u32)>,
    unk_id: u32,
    cls_id: u32,
    sep_id: u32,
}

const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

impl WordPieceTokenizer {
    /// A tokenizer over `tokens` (id = position), with BERT-uncased defaults.
    pub fn from_tokens(tokens: Vec<String>, normalizer: NormalizerOptions) -> Result<Self> {
        let vocab_len = tokens.len();
        let mut vocab = HashMap::with_capacity(tokens.len());
        for (id, token) in tokens.into_iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| EmbedError::UnsupportedConfig("vocabulary too large".into()))?;
            // First occurrence wins, as in HF's vocab.txt loader.
            vocab.entry(token).or_insert(id);
        }
        let lookup = |token: &'static str| vocab.get(token).copied().ok_or(EmbedError::MissingSpecialToken(token));
        let unk_id = lookup("[UNK]")?;
        let cls_id = lookup("[CLS]")?;
        let sep_id = lookup("[SEP]")?;
        let verbatim_specials: Vec<(String, u32)> =
            SPECIAL_TOKENS.iter().filter_map(|t| vocab.get(*t).map(|id| (t.to_string(), *id))).collect();
        Ok(WordPieceTokenizer {
            vocab,
            vocab_len,
            normalizer,
            continuing_prefix: "##".into(),
            max_chars_per_word: 100,
            verbatim_specials,
            unk_id,
            cls_id,
            sep_id,
        })
    }

    /// Loads `vocab.txt` from `dir`, and the normalizer settings and special tokens from
    /// `tokenizer.json` when it is there (BERT-uncased defaults otherwise).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.txt");
        let text =
            std::fs::read_to_string(&vocab_path).map_err(|source| EmbedError::Io { path: vocab_path, source })?;
        let tokens: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect();
        let json_path = dir.join("tokenizer.json");
        if !json_path.exists() {
            return Self::from_tokens(tokens, NormalizerOptions::default());
        }
        let raw = std::fs::read(&json_path).map_err(|source| EmbedError::Io { path: json_path.clone(), source })?;
        let json: serde_json::Value = serde_json::from_slice(&raw).map_err(|source| EmbedError::Json {
            path: json_path.clone(),
            what: "a tokenizer",
            source,
        })?;
        let bad = |message: String| EmbedError::BadFile { path: json_path.clone(), message };
        let normalizer = match json.get("normalizer") {
            Some(n) if n.get("type").and_then(|t| t.as_str()) == Some("BertNormalizer") => {
                let flag = |key: &str, default: bool| n.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
                NormalizerOptions {
                    clean_text: flag("clean_text", true),
                    handle_chinese_chars: flag("handle_chinese_chars", true),
                    strip_accents: n.get("strip_accents").and_then(|v| v.as_bool()),
                    lowercase: flag("lowercase", true),
                }
            }
            Some(other) => return Err(bad(format!("unsupported normalizer {other}; only BertNormalizer"))),
            None => NormalizerOptions::default(),
        };
        if let Some(pre) = json.get("pre_tokenizer").and_then(|p| p.get("type")).and_then(|t| t.as_str())
            && pre != "BertPreTokenizer"
        {
            return Err(bad(format!("unsupported pre_tokenizer {pre}; only BertPreTokenizer")));
        }
        let model = json.get("model");
        if let Some(kind) = model.and_then(|m| m.get("type")).and_then(|t| t.as_str())
            && kind != "WordPiece"
        {
            return Err(bad(format!("unsupported tokenizer model {kind}; only WordPiece")));
        }
        let mut tokenizer = Self::from_tokens(tokens, normalizer)?;
        if let Some(prefix) = model.and_then(|m| m.get("continuing_subword_prefix")).and_then(|v| v.as_str()) {
            tokenizer.continuing_prefix = prefix.to_string();
        }
        if let Some(max) = model.and_then(|m| m.get("max_input_chars_per_word")).and_then(|v| v.as_u64()) {
            tokenizer.max_chars_per_word = usize::try_from(max).unwrap_or(usize::MAX);
        }
        if let Some(unk) = model.and_then(|m| m.get("unk_token")).and_then(|v| v.as_str()) {
            tokenizer.unk_id = *tokenizer.vocab.get(unk).ok_or_else(|| bad(format!("unk_token {unk} not in vocab")))?;
        }
        if let Some(added) = json.get("added_tokens").and_then(|a| a.as_array()) {
            let mut specials = Vec::new();
            for token in added {
                let content = token.get("content").and_then(|c| c.as_str());
                let id = token.get("id").and_then(|i| i.as_u64()).and_then(|i| u32::try_from(i).ok());
                let normalized = token.get("normalized").and_then(|n| n.as_bool()).unwrap_or(false);
                // Tokens matched after normalization would need the normalizer's offsets; the BERT
                // family only ships raw-matched specials, so anything else is refused, not guessed.
                match (content, id) {
                    (Some(content), Some(id)) if !normalized => specials.push((content.to_string(), id)),
                    _ => return Err(bad(format!("unsupported added token {token}"))),
                }
            }
            tokenizer.verbatim_specials = specials;
        }
        Ok(tokenizer)
    }

    pub fn vocab_len(&self) -> usize {
        self.vocab_len
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// `[CLS] tokens… [SEP]`, the tokens cut so the whole fits in `max_len` (at least 2).
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        ids.push(self.cls_id);
        self.tokenize_into(text, &mut ids);
        ids.truncate(max_len.max(2) - 1);
        ids.push(self.sep_id);
        ids
    }

    /// Word-piece ids of `text` without the special tokens around them.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.tokenize_into(text, &mut ids);
        ids
    }

    fn tokenize_into(&self, text: &str, ids: &mut Vec<u32>) {
        let mut rest = text;
        while !rest.is_empty() {
            match self.next_special(rest) {
                Some((at, len, id)) => {
                    self.tokenize_plain(&rest[..at], ids);
                    ids.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.tokenize_plain(rest, ids);
                    break;
                }
            }
        }
    }

    /// The leftmost special token in `text` (longest one at that position): (byte offset, byte length, id).
    fn next_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        if self.verbatim_specials.is_empty() {
            return None;
        }
        let mut best: Option<(usize, usize, u32)> = None;
        for (content, id) in &self.verbatim_specials {
            if content.is_empty() {
                continue;
            }
            if let Some(at) = text.find(content.as_str())
                && best.is_none_or(|(b_at, b_len, _)| at < b_at || (at == b_at && content.len() > b_len))
            {
                best = Some((at, content.len(), *id));
            }
        }
        best
    }

    fn tokenize_plain(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalized = self.normalize(text);
        let mut candidate = String::new();
        for word in pre_tokenize(&normalized) {
            self.word_piece(word, &mut candidate, ids);
        }
    }

    /// HF `BertNormalizer`: clean, space out CJK, strip accents, lowercase, in that order.
    pub fn normalize(&self, text: &str) -> String {
        let opts = self.normalizer;
        let mut out = String::with_capacity(text.len() + 8);
        for c in text.chars() {
            if opts.clean_text {
                if c == '\0' || c == '\u{fffd}' || is_control(c) {
                    continue;
                }
                if is_normalizer_whitespace(c) {
                    out.push(' ');
                    continue;
                }
            }
            if opts.handle_chinese_chars && is_chinese_char(c) {
                out.push(' ');
                out.push(c);
                out.push(' ');
                continue;
            }
            out.push(c);
        }
        if opts.strip_accents.unwrap_or(opts.lowercase) && !out.is_ascii() {
            out = out.nfd().filter(|c| c.general_category() != GeneralCategory::NonspacingMark).collect();
        }
        if opts.lowercase {
            // Per character, like HF: `str::to_lowercase` would turn a word-final Σ into ς.
            let mut lowered = String::with_capacity(out.len());
            for c in out.chars() {
                lowered.extend(c.to_lowercase());
            }
            out = lowered;
        }
        out
    }

    fn word_piece(&self, word: &str, candidate: &mut String, ids: &mut Vec<u32>) {
        if word.chars().count() > self.max_chars_per_word {
            ids.push(self.unk_id);
            return;
        }
        let first_piece = ids.len();
        let mut start = 0;
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                candidate.clear();
                if start > 0 {
                    candidate.push_str(&self.continuing_prefix);
                }
                candidate.push_str(&word[start..end]);
                if let Some(id) = self.vocab.get(candidate.as_str()) {
                    found = Some(*id);
                    break;
                }
                end -= word[start..end].chars().next_back().map_or(1, char::len_utf8);
            }
            match found {
                Some(id) => {
                    ids.push(id);
                    start = end;
                }
                None => {
                    // One unknown piece makes the whole word unknown, as in BERT's reference code.
                    ids.truncate(first_piece);
                    ids.push(self.unk_id);
                    return;
                }
            }
        }
    }
}

/// HF `BertPreTokenizer`: split on whitespace (dropped) and around every punctuation character (kept).
fn pre_tokenize(text: &str) -> impl Iterator<Item = &str> {
    let mut words = Vec::new();
    let mut word_start: Option<usize> = None;
    for (at, c) in text.char_indices() {
        if c.is_whitespace() {
            if let Some(start) = word_start.take() {
                words.push(&text[start..at]);
            }
        } else if is_bert_punctuation(c) {
            if let Some(start) = word_start.take() {
                words.push(&text[start..at]);
            }
            words.push(&text[at..at + c.len_utf8()]);
        } else if word_start.is_none() {
            word_start = Some(at);
        }
    }
    if let Some(start) = word_start {
        words.push(&text[start..]);
    }
    words.into_iter()
}

fn is_normalizer_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

/// Categories Cc, Cf, Co (and Cs, which `char` cannot hold); not Cn, matching HF's table.
fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    matches!(
        c.general_category(),
        GeneralCategory::Control | GeneralCategory::Format | GeneralCategory::PrivateUse | GeneralCategory::Surrogate
    )
}

fn is_bert_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || c.general_category_group() == GeneralCategoryGroup::Punctuation
}

/// The CJK Unified Ideograph blocks BERT puts spaces around (not Hangul, kana, or CJK punctuation).
fn is_chinese_char(c: char) -> bool {
    matches!(
        c as u32,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> WordPieceTokenizer {
        let tokens = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "un", "##aff", "##able", ",", "!", "cafe",
            "中", "ab", "σοσ", "##σ", "i",
        ];
        WordPieceTokenizer::from_tokens(tokens.iter().map(|t| t.to_string()).collect(), NormalizerOptions::default())
            .unwrap()
    }

    #[test]
    fn greedy_longest_match_with_continuations_and_unknown_words() {
        let t = tiny();
        // [CLS]=2 hello=5 ,=10 unaffable=7,8,9 !=11 xyz=[UNK]=1 [SEP]=3
        assert_eq!(t.encode("Hello, unaffable! xyz", 256), vec![2, 5, 10, 7, 8, 9, 11, 1, 3]);
    }

    #[test]
    fn normalizer_strips_accents_lowercases_and_spaces_cjk() {
        let t = tiny();
        assert_eq!(t.normalize("Café\u{200d}\u{0}X中文\tİ"), "cafex 中  文  i");
        assert_eq!(t.encode("CAFÉ中", 256), vec![2, 12, 13, 3]);
        // Per-char lowercasing keeps a final sigma as σ.
        assert_eq!(t.encode("ΣΟΣ", 256), vec![2, 15, 3]);
    }

    #[test]
    fn specials_in_raw_text_are_matched_verbatim_and_truncation_keeps_sep() {
        let t = tiny();
        assert_eq!(t.encode("hello[SEP]world", 256), vec![2, 5, 3, 6, 3]);
        assert_eq!(t.encode("hello world hello world", 4), vec![2, 5, 6, 3]);
        let long = "a".repeat(101);
        assert_eq!(t.tokenize(&long), vec![1]);
    }
}

//! BERT WordPiece tokenization with the semantics of Hugging Face `tokenizers`' `BertNormalizer`,
//! `BertPreTokenizer`, `WordPiece` model and the `[CLS] … [SEP]` template, so ids match what the
//! encoder was trained on. Written here because the `tokenizers` crate is far heavier than this job.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind};

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
    /// `verbatim_specials` as one automaton, so a text full of them is searched once, not once per special
    /// found; `None` when there are none.
    special_matcher: Option<AhoCorasick>,
    /// The id of each of `special_matcher`'s patterns.
    special_matcher_ids: Vec<u32>,
    unk_id: u32,
    cls_id: u32,
    sep_id: u32,
}

const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Plain text is normalized and split this many bytes at a time (up to the next ASCII space), so that
/// [`WordPieceTokenizer::encode`] stops soon after it has enough ids, however long the text.
const PLAIN_CHUNK_BYTES: usize = 4096;

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
        let mut tokenizer = WordPieceTokenizer {
            vocab,
            vocab_len,
            normalizer,
            continuing_prefix: "##".into(),
            max_chars_per_word: 100,
            verbatim_specials: Vec::new(),
            special_matcher: None,
            special_matcher_ids: Vec::new(),
            unk_id,
            cls_id,
            sep_id,
        };
        tokenizer.set_specials(verbatim_specials)?;
        Ok(tokenizer)
    }

    fn set_specials(&mut self, specials: Vec<(String, u32)>) -> Result<()> {
        let mut seen = HashSet::new();
        let mut patterns = Vec::new();
        let mut ids = Vec::new();
        for (content, id) in &specials {
            // Of two equal contents the first is matched, as when the list was searched in order; an empty
            // one would match everywhere and never did.
            if !content.is_empty() && seen.insert(content.as_str()) {
                patterns.push(content.as_str());
                ids.push(*id);
            }
        }
        self.special_matcher = if patterns.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&patterns)
                    .map_err(|e| EmbedError::UnsupportedConfig(format!("special tokens: {e}")))?,
            )
        };
        self.special_matcher_ids = ids;
        self.verbatim_specials = specials;
        Ok(())
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
            tokenizer.set_specials(specials)?;
        }
        Ok(tokenizer)
    }

    pub fn vocab_len(&self) -> usize {
        self.vocab_len
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Fails, naming the token, when an id this tokenizer can emit is not below `vocab_size`. Vocabulary ids
    /// are below [`Self::vocab_len`], but tokenizer.json's `added_tokens` carry ids of their own that nothing
    /// else bounds, and an embedding lookup past the table would panic mid-batch.
    pub fn check_ids_below(&self, vocab_size: usize) -> Result<()> {
        let fixed = [("unk_token", self.unk_id), ("[CLS]", self.cls_id), ("[SEP]", self.sep_id)];
        let specials = self.verbatim_specials.iter().map(|(content, id)| (content.as_str(), *id));
        match fixed.into_iter().chain(specials).find(|&(_, id)| id as usize >= vocab_size) {
            Some((token, id)) => Err(EmbedError::UnsupportedConfig(format!(
                "tokenizer token {token:?} has id {id}, outside the model's vocabulary of {vocab_size}"
            ))),
            None => Ok(()),
        }
    }

    /// `[CLS] tokens… [SEP]`, the tokens cut so the whole fits in `max_len` (at least 2).
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        self.encode_noting_cut(text, max_len).0
    }

    /// [`encode`](Self::encode), and whether tokens were cut: an encoding of part of a text says nothing about
    /// the rest, where a harmful request may follow a page of harmless text.
    pub fn encode_noting_cut(&self, text: &str, max_len: usize) -> (Vec<u32>, bool) {
        // [CLS] and the pieces; [SEP] comes after.
        let keep = max_len.max(2) - 1;
        let mut ids = Vec::with_capacity((text.len() / 3 + 2).min(keep.saturating_add(2)));
        ids.push(self.cls_id);
        // Pieces are produced in order and never revised once a word is done, so stopping early gives the
        // prefix the whole text would have; what lies past `max_len` costs nothing. Tokenizing stops only once
        // one piece more than fits is there, so fewer means the whole text was read.
        self.tokenize_into(text, &mut ids, keep.saturating_add(1));
        let cut = ids.len() > keep;
        ids.truncate(keep);
        ids.push(self.sep_id);
        (ids, cut)
    }

    /// Word-piece ids of `text` without the special tokens around them.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.tokenize_into(text, &mut ids, usize::MAX);
        ids
    }

    /// Appends `text`'s ids to `ids`, stopping once `ids` holds at least `limit` (it may then hold a few more).
    fn tokenize_into(&self, text: &str, ids: &mut Vec<u32>, limit: usize) {
        let mut plain_start = 0;
        if let Some(matcher) = &self.special_matcher {
            for m in matcher.find_iter(text) {
                if ids.len() >= limit {
                    return;
                }
                // Patterns are whole UTF-8 strings, so matches start and end on character boundaries.
                self.tokenize_plain(text.get(plain_start..m.start()).unwrap_or_default(), ids, limit);
                if let Some(&id) = self.special_matcher_ids.get(m.pattern().as_usize()) {
                    ids.push(id);
                }
                plain_start = m.end();
            }
        }
        if ids.len() < limit {
            self.tokenize_plain(text.get(plain_start..).unwrap_or_default(), ids, limit);
        }
    }

    /// Text without specials, a chunk at a time. Chunks end just before an ASCII space: the normalizer maps
    /// it to a space on its own and the pre-tokenizer splits there, so chunking never changes a word.
    fn tokenize_plain(&self, text: &str, ids: &mut Vec<u32>, limit: usize) {
        let mut rest = text;
        let mut candidate = String::new();
        while !rest.is_empty() && ids.len() < limit {
            let chunk_end = match rest.as_bytes().get(PLAIN_CHUNK_BYTES..) {
                Some(tail) => tail.iter().position(|&b| b == b' ').map_or(rest.len(), |at| PLAIN_CHUNK_BYTES + at),
                None => rest.len(),
            };
            let (chunk, tail) = rest.split_at_checked(chunk_end).unwrap_or((rest, ""));
            let normalized = self.normalize(chunk);
            for word in pre_tokenize(&normalized) {
                if ids.len() >= limit {
                    return;
                }
                self.word_piece(word, &mut candidate, ids);
            }
            rest = tail;
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

    /// Each special found used to search the rest of the text for every special again: quadratic on a text
    /// made of them. Ids are unchanged, and a long text stops being read once `max_len` is reached.
    #[test]
    fn long_texts_of_specials_give_the_ids_of_their_prefix() {
        let t = tiny();
        let text = "[SEP]".repeat(400_000);
        for max_len in [2, 3, 8, 21] {
            assert_eq!(t.encode(&text, max_len), t.encode(&text[..100], max_len), "max_len {max_len}");
        }
        assert_eq!(t.encode(&text, 8), vec![2, 3, 3, 3, 3, 3, 3, 3]);
        let mixed = "hello [SEP]world[CLS][SEP] unaffable!".repeat(50_000);
        let head = &mixed[..37 * 20];
        assert_eq!(t.encode(&mixed, 64), t.encode(head, 64));
        assert_eq!(t.tokenize(&mixed[..37 * 3]), [5, 3, 6, 2, 3, 7, 8, 9, 11].repeat(3));
    }

    /// Plain text is read in chunks; words straddling a chunk edge, and whitespace the normalizer drops or
    /// turns into a space, come out as they did from the whole text at once.
    #[test]
    fn chunked_plain_text_matches_whole_text_tokenization() {
        let t = tiny();
        let whole = |text: &str| {
            let mut ids = Vec::new();
            let mut candidate = String::new();
            for word in pre_tokenize(&t.normalize(text)) {
                t.word_piece(word, &mut candidate, &mut ids);
            }
            ids
        };
        let pieces = ["hello", " ", "world", "unaffable", ",", "\u{b}", "\u{85}", "\t", "\n", "Café", "中", "x", "  "];
        let mut text = String::new();
        let mut state = 7u64;
        while text.len() < 5 * PLAIN_CHUNK_BYTES {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push_str(pieces[(state >> 33) as usize % pieces.len()]);
        }
        assert_eq!(t.tokenize(&text), whole(&text));
        let ids = whole(&text);
        for max_len in [2, 50, 1000, ids.len() + 1, ids.len() + 2, usize::MAX] {
            let mut expected = vec![2];
            expected.extend(ids.iter().take(max_len.max(2) - 2));
            expected.push(3);
            assert_eq!(t.encode(&text, max_len), expected, "max_len {max_len}");
        }
    }

    #[test]
    fn specials_in_raw_text_are_matched_verbatim_and_truncation_keeps_sep() {
        let t = tiny();
        assert_eq!(t.encode("hello[SEP]world", 256), vec![2, 5, 3, 6, 3]);
        assert_eq!(t.encode("hello world hello world", 4), vec![2, 5, 6, 3]);
        let long = "a".repeat(101);
        assert_eq!(t.tokenize(&long), vec![1]);
    }

    /// A text whose pieces all fit is not cut; one piece more is. With specials, and past a chunk edge.
    #[test]
    fn an_encoding_says_whether_it_cut_the_text() {
        let t = tiny();
        let text = "hello world hello world";
        assert_eq!(t.encode_noting_cut(text, 6), (vec![2, 5, 6, 5, 6, 3], false));
        assert_eq!(t.encode_noting_cut(text, 5), (vec![2, 5, 6, 5, 3], true));
        assert_eq!(t.encode_noting_cut("hello[SEP]", 4), (vec![2, 5, 3, 3], false));
        assert_eq!(t.encode_noting_cut("hello[SEP]world", 4), (vec![2, 5, 3, 3], true));
        let long = format!("{}hello", " ".repeat(3 * PLAIN_CHUNK_BYTES));
        assert_eq!(t.encode_noting_cut(&long, 3), (vec![2, 5, 3], false));
        assert_eq!(t.encode_noting_cut(&format!("{long} world"), 3), (vec![2, 5, 3], true));
        assert_eq!(t.encode_noting_cut("", usize::MAX), (vec![2, 3], false));
    }
}

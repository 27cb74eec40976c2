use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

/// The `o200k_harmony` tokenizer (o200k_base ranks plus the harmony specials).
pub struct Tokenizer {
    bpe: CoreBPE,
}

/// What an id that is not in the vocabulary decodes to, so garbage never aborts decoding.
const REPLACEMENT: &str = "\u{FFFD}";

static SHARED: OnceLock<Tokenizer> = OnceLock::new();

impl Tokenizer {
    /// The process-wide tokenizer. Building the BPE tables takes about 170 ms, so it happens once.
    pub fn shared() -> &'static Tokenizer {
        SHARED.get_or_init(|| {
            // The vocabulary is compiled into tiktoken-rs; failing to parse it is a build defect, not an input error.
            let bpe = tiktoken_rs::o200k_harmony().expect("embedded o200k_harmony vocabulary is valid");
            Tokenizer { bpe }
        })
    }

    /// Tokenizes text as plain text: `<|end|>` and friends inside `text` become ordinary tokens.
    /// This is the security boundary between untrusted content and the prompt's structure.
    ///
    /// A run of one kind of character longer than [`MAX_RUN`] (a megabyte of spaces in a policy) is encoded in
    /// pieces: tiktoken's pre-tokenizing regex backtracks once per character of a run, exceeds fancy-regex's
    /// backtrack limit at about a million, and tiktoken-rs unwraps that error into a panic. Only the token at each cut can differ from one pass over the run, which no
    /// reference tokenizer can encode at all.
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let cuts = long_run_cuts(text);
        if cuts.is_empty() {
            return self.bpe.encode_ordinary(text);
        }
        let mut tokens = Vec::new();
        let mut start = 0;
        for end in cuts.into_iter().chain([text.len()]) {
            tokens.extend(self.bpe.encode_ordinary(&text[start..end]));
            start = end;
        }
        tokens
    }

    /// Decodes ids to text. Specials come out as their text (`<|end|>`), invalid UTF-8 and ids outside the
    /// vocabulary as U+FFFD.
    pub fn decode_lossy(&self, tokens: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(tokens.len() * 4);
        for &id in tokens {
            match self.token_bytes(id) {
                Some(b) => bytes.extend_from_slice(&b),
                None => bytes.extend_from_slice(REPLACEMENT.as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw bytes of one token (possibly part of a UTF-8 character); specials give their text.
    /// `None` for ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.bpe.decode_bytes(&[id]).ok()
    }

    /// Number of tokens `text` takes as content.
    pub fn count(&self, text: &str) -> usize {
        self.encode_ordinary(text).len()
    }
}

/// Longest run of one kind of character encoded in one pass; see [`Tokenizer::encode_ordinary`].
const MAX_RUN: usize = 100_000;

/// Where to cut `text` so that no piece holds more than [`MAX_RUN`] characters of one kind in a row: whitespace,
/// digits, or anything else. Letters, marks and punctuation are one kind, so that a run the regex reads as one
/// piece (a word with its combining marks, a line of `^`) is always caught; the price is a cut in the odd text
/// of 100,000 characters without a space or a digit. Empty for any ordinary text.
fn long_run_cuts(text: &str) -> Vec<usize> {
    fn kind(c: char) -> u8 {
        if c.is_whitespace() {
            0
        } else if c.is_numeric() {
            1
        } else {
            2
        }
    }
    let mut cuts = Vec::new();
    let mut current = None;
    let mut run = 0usize;
    for (at, c) in text.char_indices() {
        let this = kind(c);
        if current == Some(this) {
            run += 1;
            if run > MAX_RUN {
                cuts.push(at);
                run = 1;
            }
        } else {
            current = Some(this);
            run = 1;
        }
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run the pre-tokenizer cannot take in one pass is encoded in pieces, and decodes to what it was.
    #[test]
    fn a_megabyte_of_one_character_encodes() {
        let tokenizer = Tokenizer::shared();
        for filler in [" ", "^"] {
            let text = format!("{}x", filler.repeat(1_000_050));
            let tokens = tokenizer.encode_ordinary(&text);
            assert_eq!(tokenizer.decode_lossy(&tokens), text, "{filler:?}");
        }
        assert!(long_run_cuts("an ordinary sentence, with 123 digits.").is_empty());
        assert_eq!(long_run_cuts(&" ".repeat(MAX_RUN + 1)), vec![MAX_RUN]);
    }
}

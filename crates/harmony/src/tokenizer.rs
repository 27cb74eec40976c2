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
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        self.bpe.encode_ordinary(text)
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
        self.bpe.encode_ordinary(text).len()
    }
}

//! Hashed n-gram features: word uni/bi-grams and character n-grams, signed feature hashing.
//!
//! Nothing here allocates: normalization, word hashes (FNV-1a) and character n-gram keys (the last bytes of an
//! 8-byte shift register) are computed in one streaming pass, and features go into a caller-owned
//! buffer or straight into a dot product.

use serde::{Deserialize, Serialize};

use crate::TriageError;

/// Largest supported hash space; beyond this the weight file stops fitting in cache for no measured gain.
pub const MAX_HASH_BITS: u32 = 24;
/// Longest character n-gram; the rolling hash keeps one state per order up to this.
pub const MAX_CHAR_NGRAM: u8 = 8;

/// Which n-grams are hashed and into how many buckets. Stored in `model.json`: a model only makes sense
/// with the exact featurization it was trained with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    /// log2 of the number of weight buckets.
    pub hash_bits: u32,
    pub word_unigrams: bool,
    pub word_bigrams: bool,
    /// Inclusive range of character n-gram lengths (in bytes of the normalized text); `None` disables them.
    pub char_ngrams: Option<(u8, u8)>,
    /// Signed hashing: the sign of each feature comes from a hash bit, so collisions cancel on average
    /// instead of piling up.
    pub signed: bool,
    /// One more feature for the text's length class (bit length of its byte count, capped at 2^16 bytes),
    /// added to the margin outside the L2 normalization: long prompts (role-play set-ups, jailbreaks) are
    /// several times likelier to violate, a prior that n-gram weights diluted by the normalization cannot
    /// carry. Absent in artifacts written before it existed, where it is off.
    #[serde(default)]
    pub length_feature: bool,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            // 2^18 f32 weights = 1 MiB stays in L2/L3 cache; 2^20 measured the same AUC on ToxicChat but scores
            // about half as fast (BENCHMARKS.md, "Triage").
            hash_bits: 18,
            word_unigrams: true,
            word_bigrams: true,
            char_ngrams: Some((3, 5)),
            signed: true,
            // +0.005 out-of-fold AUC and about +0.05 skip at 99 % recall on ToxicChat train (BENCHMARKS.md).
            length_feature: true,
        }
    }
}

impl FeatureConfig {
    /// Word uni+bigrams only: the cheaper of the two featurizations compared in BENCHMARKS.md.
    /// Without the length feature, which did not help words alone out of fold.
    pub fn words_only() -> Self {
        FeatureConfig { char_ngrams: None, length_feature: false, ..FeatureConfig::default() }
    }

    pub fn buckets(&self) -> usize {
        1usize << self.hash_bits
    }

    pub fn validate(&self) -> Result<(), TriageError> {
        if self.hash_bits == 0 || self.hash_bits > MAX_HASH_BITS {
            return Err(TriageError::InvalidConfig(format!(
                "hash_bits must be in 1..={MAX_HASH_BITS}, got {}",
                self.hash_bits
            )));
        }
        if let Some((lo, hi)) = self.char_ngrams
            && (lo == 0 || lo > hi || hi > MAX_CHAR_NGRAM)
        {
            return Err(TriageError::InvalidConfig(format!(
                "char_ngrams must satisfy 1 <= min <= max <= {MAX_CHAR_NGRAM}, got ({lo}, {hi})"
            )));
        }
        if !self.word_unigrams && !self.word_bigrams && self.char_ngrams.is_none() {
            return Err(TriageError::InvalidConfig("feature config enables no features".into()));
        }
        Ok(())
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
// Distinct seeds keep a word unigram "abc" and the character trigram "abc" in different buckets.
const SEED_WORD: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED_BIGRAM: u64 = 0xc2b2_ae3d_27d4_eb4f;
const SEED_LENGTH: u64 = 0x7a3c_51e9_b04d_2f61;
const LONGEST_LENGTH_CLASS: u32 = 17;
/// Indexed by n-gram length; each differs in its top bytes, where no key of 7 bytes or fewer has bits.
const CHAR_LENGTH_SEEDS: [u64; MAX_CHAR_NGRAM as usize + 1] = [
    0x1656_67b1_9e37_79f9,
    0x27d4_eb2f_1656_67c5,
    0x85eb_ca77_c2b2_ae63,
    0xd6e8_feb8_6659_fd93,
    0xa076_1d64_78bd_642f,
    0xe703_7ed1_a0b4_28db,
    0x8ebc_6af0_9c88_c6e3,
    0x5899_65cc_7537_4cc3,
    0x1d8e_4e27_c47d_124f,
];

/// Low-byte masks by n-gram length; length 8 keeps the whole window.
const CHAR_MASKS: [u64; MAX_CHAR_NGRAM as usize + 1] = {
    let mut masks = [u64::MAX; MAX_CHAR_NGRAM as usize + 1];
    let mut n = 0;
    while n < MAX_CHAR_NGRAM as usize {
        masks[n] = (1u64 << (8 * n)) - 1;
        n += 1;
    }
    masks
};
const BUCKET_MASK: u32 = (1 << MAX_HASH_BITS) - 1;
const SIGN_BIT: u32 = 1 << 31;

/// Receives feature keys from [`Featurizer::scan`].
trait FeatureSink {
    fn put(&mut self, key: u64);
    /// Called after the features that end at each byte.
    #[inline(always)]
    fn after_byte(&mut self) {}
}

/// A closure as a sink.
struct EachKey<F>(F);

impl<F: FnMut(u64)> FeatureSink for EachKey<F> {
    #[inline(always)]
    fn put(&mut self, key: u64) {
        (self.0)(key)
    }
}

const DOT_STAGE: usize = 64;
/// One byte adds at most two word features and `MAX_CHAR_NGRAM` character n-grams, and the buffer is flushed
/// after any byte that fills it to `DOT_STAGE`, so this much room beyond it never overflows.
const DOT_SLACK: usize = 2 + MAX_CHAR_NGRAM as usize;

/// The dot product's sink: keys are staged in a small buffer and hashed, looked up and summed in a separate
/// tight loop, so the weight reads (cache misses for big tables) do not wait on each other or on the hashing.
struct DotSink<'a> {
    featurizer: &'a Featurizer,
    weights: &'a [f32],
    staged: [u64; DOT_STAGE + DOT_SLACK],
    len: usize,
    /// Alternate features go to alternate accumulators, across flushes too (`odd`: the next one goes to the
    /// second), which halves the add dependency chain and keeps the sum bit-identical to adding the features
    /// one by one in that pattern.
    sums: [f32; 2],
    odd: bool,
    count: usize,
}

impl DotSink<'_> {
    #[inline(always)]
    fn signed_weight(&self, key: u64) -> f32 {
        let packed = self.featurizer.bucket_and_sign(key);
        // The bucket is below 2^hash_bits, the length of `weights` (checked on load). Flipping the sign bit is
        // exactly multiplying by -1.
        f32::from_bits(self.weights[(packed & BUCKET_MASK) as usize].to_bits() ^ (packed & SIGN_BIT))
    }

    #[inline(always)]
    fn flush(&mut self) {
        let mut sums = self.sums;
        let mut rest = &self.staged[..self.len];
        if self.odd
            && let [first, tail @ ..] = rest
        {
            sums[1] += self.signed_weight(*first);
            rest = tail;
            self.odd = false;
        }
        let mut pairs = rest.chunks_exact(2);
        for pair in &mut pairs {
            sums[0] += self.signed_weight(pair[0]);
            sums[1] += self.signed_weight(pair[1]);
        }
        if let [last] = pairs.remainder() {
            sums[0] += self.signed_weight(*last);
            self.odd = true;
        }
        self.sums = sums;
        self.count += self.len;
        self.len = 0;
    }
}

impl FeatureSink for DotSink<'_> {
    #[inline(always)]
    fn put(&mut self, key: u64) {
        self.staged[self.len] = key;
        self.len += 1;
    }

    #[inline(always)]
    fn after_byte(&mut self) {
        if self.len >= DOT_STAGE {
            self.flush();
        }
    }
}

/// Multiply-shift hashing (Fibonacci): one multiply, buckets from the well-mixed high bits. The xor-shift
/// first folds the high half (where the n-gram length tag sits) into the low half that the multiply spreads.
#[inline(always)]
fn mix(h: u64) -> u64 {
    (h ^ (h >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[inline(always)]
fn fnv_step(h: u64, byte: u8) -> u64 {
    (h ^ byte as u64).wrapping_mul(FNV_PRIME)
}

#[inline(always)]
fn is_word_byte(b: u8) -> bool {
    // Bytes >= 0x80 are parts of non-ASCII letters; treating them as word bytes keeps e.g. Cyrillic words whole.
    b.is_ascii_alphanumeric() || b >= 0x80
}

/// Turns text into hashed features. Holds no buffers: normalization and hashing are streamed over the
/// bytes with an 8-byte shift register for character n-grams, so one `Featurizer` can be shared by threads.
#[derive(Debug, Clone)]
pub struct Featurizer {
    config: FeatureConfig,
}

impl Featurizer {
    pub fn new(config: FeatureConfig) -> Result<Self, TriageError> {
        config.validate()?;
        Ok(Featurizer { config })
    }

    pub fn config(&self) -> &FeatureConfig {
        &self.config
    }

    /// Calls `sink.put(key)` with the unmixed key of every feature of `text`, in a fixed order (at each byte of the
    /// normalized text: the word unigram and bigram that end there, then its character n-grams, shortest first).
    ///
    /// The text is seen ASCII-lowercased, with whitespace runs collapsed to one space and a space at each
    /// end, so that character n-grams see word starts and ends. Written as one loop over the bytes with the
    /// per-byte step expanded in place (a macro, not a closure) so that it is inlined into its callers.
    // The last expansion of `feed!` leaves word state that nothing reads afterwards.
    #[allow(unused_assignments)]
    #[inline(always)]
    fn scan(&self, text: &str, sink: &mut impl FeatureSink) {
        let unigrams = self.config.word_unigrams;
        let bigrams = self.config.word_bigrams;
        let words = unigrams || bigrams;
        let (char_lo, char_hi) = match self.config.char_ngrams {
            Some((lo, hi)) => (lo as usize, hi as usize),
            None => (usize::MAX, 0),
        };

        // Last up-to-8 normalized bytes, newest in the low byte.
        let mut window: u64 = 0;
        let mut seen: usize = 0;
        let mut word_hash = FNV_OFFSET;
        let mut in_word = false;
        let mut previous_word: Option<u64> = None;

        macro_rules! feed {
            ($byte:expr) => {{
                let b: u8 = $byte;
                if words {
                    if is_word_byte(b) {
                        word_hash = fnv_step(word_hash, b);
                        in_word = true;
                    } else if in_word {
                        if unigrams {
                            sink.put(word_hash ^ SEED_WORD);
                        }
                        if bigrams && let Some(prev) = previous_word {
                            sink.put(prev.rotate_left(17).wrapping_mul(FNV_PRIME) ^ word_hash ^ SEED_BIGRAM);
                        }
                        previous_word = Some(word_hash);
                        word_hash = FNV_OFFSET;
                        in_word = false;
                    }
                }
                if char_hi > 0 {
                    window = (window << 8) | b as u64;
                    seen += 1;
                    let longest = seen.min(char_hi);
                    // The last n bytes of the window are the n-gram itself (read backwards, as good a key as
                    // forwards), so the key is exact and costs a mask; the per-length seed keeps "abc" and
                    // the 4-gram " abc" apart.
                    let mut n = char_lo;
                    while n <= longest {
                        sink.put((window & CHAR_MASKS[n]) ^ CHAR_LENGTH_SEEDS[n]);
                        n += 1;
                    }
                }
                sink.after_byte();
            }};
        }

        // One expansion of `feed!` (so one copy of each call to `put`, which then gets inlined): the text
        // between a virtual space before and after it.
        let bytes = text.as_bytes();
        let mut last_space = false;
        for i in 0..bytes.len() + 2 {
            let b = if i == 0 || i > bytes.len() { b' ' } else { bytes[i - 1] };
            if b.is_ascii_whitespace() {
                if last_space {
                    continue;
                }
                last_space = true;
                feed!(b' ');
            } else {
                last_space = false;
                feed!(b.to_ascii_lowercase());
            }
        }
    }

    /// The bucket of a feature key, with the sign in bit 31 (buckets are below 2^24).
    #[inline(always)]
    fn bucket_and_sign(&self, key: u64) -> u32 {
        let shift = 64 - self.config.hash_bits;
        let h = mix(key);
        // The bit just below the bucket bits picks the sign: set straight into the float's sign bit, as a
        // branch here would be mispredicted half the time.
        let sign_bit = ((h >> (shift - 1)) & self.config.signed as u64) as u32;
        (h >> shift) as u32 | (sign_bit << 31)
    }

    /// The length-class feature as a packed bucket and sign, when the config has it.
    #[inline(always)]
    fn length_feature(&self, text: &str) -> Option<u32> {
        self.config.length_feature.then(|| {
            let class = (usize::BITS - text.len().leading_zeros()).min(LONGEST_LENGTH_CLASS);
            self.bucket_and_sign(SEED_LENGTH ^ class as u64)
        })
    }

    /// Calls `emit(bucket, sign)` for every n-gram feature of `text` (not the length feature, which is outside
    /// the normalization); returns their number.
    /// See [`Featurizer::scan`] for the normalization and order.
    #[inline]
    pub fn for_each_feature(&self, text: &str, mut emit: impl FnMut(usize, f32)) -> usize {
        let mut count = 0usize;
        self.scan(
            text,
            &mut EachKey(|key| {
                let packed = self.bucket_and_sign(key);
                emit((packed & BUCKET_MASK) as usize, f32::from_bits(0x3f80_0000 | (packed & SIGN_BIT)));
                count += 1;
            }),
        );
        count
    }

    /// Appends `(bucket, value)` pairs to `out` (cleared first), L2-normalized by treating each emitted
    /// feature as distinct; repeated n-grams are rare enough in short texts that merging them is not worth a sort.
    pub fn featurize_into(&self, text: &str, out: &mut Vec<(u32, f32)>) {
        out.clear();
        let n = self.for_each_feature(text, |bucket, sign| out.push((bucket as u32, sign)));
        if n > 0 {
            let scale = 1.0 / (n as f32).sqrt();
            for pair in out.iter_mut() {
                pair.1 *= scale;
            }
        }
        if let Some(packed) = self.length_feature(text) {
            out.push((packed & BUCKET_MASK, f32::from_bits(0x3f80_0000 | (packed & SIGN_BIT))));
        }
    }

    /// `weights · features(text)` without materializing the features.
    ///
    /// Packed buckets are staged in a small stack buffer and summed in a separate tight loop, so the weight
    /// reads (cache misses for big tables) are independent of the hashing and of each other. Two accumulators
    /// take alternate features, and the buffer is even-sized, so the sum is bit-identical to adding the
    /// features one by one in order into two alternating accumulators.
    #[inline]
    pub fn dot(&self, text: &str, weights: &[f32]) -> f32 {
        let mut sink = DotSink {
            featurizer: self,
            weights,
            staged: [0; DOT_STAGE + DOT_SLACK],
            len: 0,
            sums: [0.0; 2],
            odd: false,
            count: 0,
        };
        self.scan(text, &mut sink);
        sink.flush();
        let (sums, count) = (sink.sums, sink.count);
        let ngrams = if count == 0 { 0.0 } else { (sums[0] + sums[1]) / (count as f32).sqrt() };
        match self.length_feature(text) {
            Some(packed) => {
                ngrams + f32::from_bits(weights[(packed & BUCKET_MASK) as usize].to_bits() ^ (packed & SIGN_BIT))
            }
            None => ngrams,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(config: FeatureConfig, text: &str) -> Vec<(u32, f32)> {
        let f = Featurizer::new(config).unwrap();
        let mut out = Vec::new();
        f.featurize_into(text, &mut out);
        out
    }

    /// The featurizer as first written (one closure per byte, features summed as they are hashed): the
    /// staged implementation must give bit-identical scores, so existing artifacts keep their thresholds.
    fn reference_for_each_feature(f: &Featurizer, text: &str, mut emit: impl FnMut(usize, f32)) -> usize {
        let shift = 64 - f.config.hash_bits;
        let signed_mask = f.config.signed as u64;
        let words = f.config.word_unigrams || f.config.word_bigrams;
        let (char_lo, char_hi) = match f.config.char_ngrams {
            Some((lo, hi)) => (lo as usize, hi as usize),
            None => (usize::MAX, 0),
        };
        let mut count = 0usize;
        let mut put = |h: u64| {
            let h = mix(h);
            // The bit just below the bucket bits picks the sign, set straight into the float's sign bit:
            // a branch here would be mispredicted half the time.
            let sign_bit = ((h >> (shift - 1)) & signed_mask) as u32;
            let sign = f32::from_bits(0x3f80_0000 | (sign_bit << 31));
            emit((h >> shift) as usize, sign);
            count += 1;
        };

        // Last up-to-8 normalized bytes, newest in the low byte.
        let mut window: u64 = 0;
        let mut seen: usize = 0;
        let mut word_hash = FNV_OFFSET;
        let mut in_word = false;
        let mut previous_word: Option<u64> = None;

        let mut feed = |b: u8| {
            if words {
                if is_word_byte(b) {
                    word_hash = fnv_step(word_hash, b);
                    in_word = true;
                } else if in_word {
                    if f.config.word_unigrams {
                        put(word_hash ^ SEED_WORD);
                    }
                    if f.config.word_bigrams
                        && let Some(prev) = previous_word
                    {
                        put(prev.rotate_left(17).wrapping_mul(FNV_PRIME) ^ word_hash ^ SEED_BIGRAM);
                    }
                    previous_word = Some(word_hash);
                    word_hash = FNV_OFFSET;
                    in_word = false;
                }
            }
            if char_hi > 0 {
                window = (window << 8) | b as u64;
                seen += 1;
                let longest = seen.min(char_hi);
                // Hash each n-gram ending here from its last byte backwards; reversed order is as good a
                // key as forward order and lets every length share one pass.
                // The last n bytes of the window are the n-gram itself, so the key is exact and costs a mask;
                // the per-length seed keeps "abc" and the 4-gram " abc" apart.
                for (n, seed) in CHAR_LENGTH_SEEDS.iter().enumerate().take(longest + 1).skip(char_lo) {
                    let key = if n >= 8 { window } else { window & ((1u64 << (8 * n)) - 1) };
                    put(key ^ seed);
                }
            }
        };

        feed(b' ');
        let mut last_space = true;
        for &b in text.as_bytes() {
            if b.is_ascii_whitespace() {
                if !last_space {
                    feed(b' ');
                    last_space = true;
                }
            } else {
                feed(b.to_ascii_lowercase());
                last_space = false;
            }
        }
        if !last_space {
            feed(b' ');
        }
        count
    }

    fn reference_dot(f: &Featurizer, text: &str, weights: &[f32]) -> f32 {
        // Two accumulators halve the floating-point add dependency chain, the bottleneck once weights are cached.
        let mut sums = [0.0f32; 2];
        let mut parity = 0usize;
        let n = reference_for_each_feature(f, text, |bucket, sign| {
            // `bucket` is below 2^hash_bits and `weights` has exactly that many entries (checked on load).
            sums[parity] += sign * weights[bucket];
            parity ^= 1;
        });
        if n == 0 { 0.0 } else { (sums[0] + sums[1]) / (n as f32).sqrt() }
    }

    #[test]
    fn staged_dot_is_bit_identical_to_the_reference() {
        let texts = [
            "",
            " ",
            "a",
            "Hello   World",
            "Ünïcödé text, with punctuation!!! and numbers 12345",
            "a much longer text that spans more than sixty-four features so that the staging buffer is flushed \
             several times over, with odd and even remainders: 1 22 333 4444 55555",
        ];
        // The reference predates the length feature.
        let base = FeatureConfig { length_feature: false, ..FeatureConfig::default() };
        let configs = [
            base.clone(),
            FeatureConfig::words_only(),
            FeatureConfig { hash_bits: 12, char_ngrams: Some((1, 8)), ..base.clone() },
            FeatureConfig { signed: false, char_ngrams: Some((2, 4)), word_bigrams: false, ..base.clone() },
        ];
        for config in configs {
            let f = Featurizer::new(config.clone()).unwrap();
            let weights: Vec<f32> =
                (0..config.buckets()).map(|i| ((i as u64 * 2_654_435_761) % 1000) as f32 / 997.0 - 0.5).collect();
            for (i, text) in texts.iter().enumerate() {
                let text = text.repeat(i.max(1));
                assert_eq!(
                    f.dot(&text, &weights).to_bits(),
                    reference_dot(&f, &text, &weights).to_bits(),
                    "{config:?} {text:?}"
                );
                let mut a = Vec::new();
                f.for_each_feature(&text, |b, s| a.push((b, s)));
                let mut b = Vec::new();
                reference_for_each_feature(&f, &text, |bucket, s| b.push((bucket, s)));
                assert_eq!(a, b);
            }
        }
    }

    /// The n-gram features alone: their counts and norms are what these tests check.
    fn ngrams_only() -> FeatureConfig {
        FeatureConfig { length_feature: false, ..FeatureConfig::default() }
    }

    #[test]
    fn counts_match_the_ngram_arithmetic() {
        let words = FeatureConfig { char_ngrams: None, ..ngrams_only() };
        // 3 words -> 3 unigrams + 2 bigrams
        assert_eq!(features(words, "the cat sat").len(), 5);
        let chars =
            FeatureConfig { word_unigrams: false, word_bigrams: false, char_ngrams: Some((3, 5)), ..ngrams_only() };
        // normalized " abcd " has 6 bytes: trigrams 4, 4-grams 3, 5-grams 2
        assert_eq!(features(chars, "abcd").len(), 9);
    }

    #[test]
    fn normalization_ignores_case_and_whitespace_runs() {
        let a = features(FeatureConfig::default(), "Hello   World");
        let b = features(FeatureConfig::default(), "hello world\n");
        assert_eq!(a, b);
        assert_ne!(a, features(FeatureConfig::default(), "hello worle"));
    }

    #[test]
    fn buckets_stay_in_range_and_are_l2_normalized() {
        let config = FeatureConfig { hash_bits: 10, ..ngrams_only() };
        let out = features(config, "Ünïcödé text, with punctuation!!! and numbers 12345");
        assert!(out.iter().all(|&(b, _)| b < 1024));
        let norm: f32 = out.iter().map(|&(_, v)| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        assert!(out.iter().any(|&(_, v)| v < 0.0), "signed hashing gives some negative features");
    }

    #[test]
    fn word_and_char_ngrams_of_same_bytes_hash_apart() {
        let word = features(FeatureConfig { char_ngrams: None, word_bigrams: false, ..ngrams_only() }, "abc");
        let chars = features(
            FeatureConfig { word_unigrams: false, word_bigrams: false, char_ngrams: Some((3, 3)), ..ngrams_only() },
            "abc",
        );
        assert_eq!(word.len(), 1);
        assert!(chars.iter().all(|c| c.0 != word[0].0));
    }

    #[test]
    fn dot_equals_sparse_product() {
        let config = FeatureConfig { hash_bits: 12, ..FeatureConfig::default() };
        let weights: Vec<f32> = (0..4096).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let text = "some text to score, twice twice";
        let sparse: f32 = features(config.clone(), text).iter().map(|&(b, v)| weights[b as usize] * v).sum();
        let f = Featurizer::new(config.clone()).unwrap();
        assert!((f.dot(text, &weights) - sparse).abs() < 1e-4);
        // The empty text has no n-grams, only its length class.
        let empty = features(config.clone(), "");
        assert_eq!(empty.len(), 1);
        assert_eq!(f.dot("", &weights), weights[empty[0].0 as usize] * empty[0].1);
        let no_length = Featurizer::new(FeatureConfig { length_feature: false, ..config }).unwrap();
        assert_eq!(no_length.dot("", &weights), 0.0);
    }

    #[test]
    fn length_feature_is_one_unnormalized_feature_by_length_class() {
        let with = FeatureConfig { hash_bits: 16, ..FeatureConfig::default() };
        let without = FeatureConfig { length_feature: false, ..with.clone() };
        let short = "a short text";
        let (a, b) = (features(with.clone(), short), features(without, short));
        assert_eq!(a.len(), b.len() + 1);
        assert_eq!(a.last().map(|p| p.1.abs()), Some(1.0), "outside the L2 normalization");
        let norm: f32 = b.iter().map(|&(_, v)| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        // Same length class, same feature; a text 64 times longer lands in another class.
        let same_class = features(with.clone(), "another text");
        assert_eq!(a.last(), same_class.last());
        assert_ne!(a.last(), features(with, &short.repeat(64)).last());
    }

    #[test]
    fn invalid_configs_are_refused() {
        assert!(Featurizer::new(FeatureConfig { hash_bits: 0, ..FeatureConfig::default() }).is_err());
        assert!(Featurizer::new(FeatureConfig { hash_bits: 30, ..FeatureConfig::default() }).is_err());
        assert!(Featurizer::new(FeatureConfig { char_ngrams: Some((4, 2)), ..FeatureConfig::default() }).is_err());
        assert!(
            Featurizer::new(FeatureConfig {
                word_unigrams: false,
                word_bigrams: false,
                char_ngrams: None,
                ..FeatureConfig::default()
            })
            .is_err()
        );
    }
}

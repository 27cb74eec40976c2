//! The o200k_harmony vocabulary in llama.cpp's "gpt2" BPE form: byte-level unicode token texts,
//! token types, and merges derived from tiktoken ranks.
//!
//! tiktoken merges by the rank of the merged result; a GPT-2 style BPE merges by the rank of the
//! pair. Listing, for every multi-byte token in rank order, the one pair that BPE over its own bytes
//! (restricted to lower ranks) ends with makes both algorithms agree.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::error::{GgufError, Result};

pub const VOCAB_SIZE: usize = 201_088;
/// Ranks 0..199998 are ordinary byte sequences; everything from here is a special token.
pub const FIRST_SPECIAL: u32 = 199_998;
pub const BOS: u32 = 199_998;
pub const EOS: u32 = 200_002;
pub const PAD: u32 = 199_999;

/// llama.cpp token types.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_CONTROL: i32 = 3;

pub struct HarmonyVocab {
    /// Token texts in GPT-2 byte-level unicode (ordinary tokens) or literal text (specials).
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// "left right" pairs in merge priority order.
    pub merges: Vec<String>,
}

/// The names o200k_harmony gives its specials (reserved slots become `<|reserved_N|>`).
pub fn special_token_text(id: u32) -> Option<String> {
    let named = match id {
        199_998 => "<|startoftext|>",
        199_999 => "<|endoftext|>",
        200_002 => "<|return|>",
        200_003 => "<|constrain|>",
        200_005 => "<|channel|>",
        200_006 => "<|start|>",
        200_007 => "<|end|>",
        200_008 => "<|message|>",
        200_012 => "<|call|>",
        id if (FIRST_SPECIAL..VOCAB_SIZE as u32).contains(&id) => return Some(format!("<|reserved_{id}|>")),
        _ => return None,
    };
    Some(named.to_string())
}

/// GPT-2's reversible byte -> unicode char map: printable bytes map to themselves, the rest to 256+n.
pub fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let cp = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(cp).unwrap_or('\u{fffd}');
    }
    table
}

pub fn bytes_to_unicode_string(bytes: &[u8], table: &[char; 256]) -> String {
    bytes.iter().map(|&b| table[b as usize]).collect()
}

/// FNV-1a: the merge derivation hashes ~10M short byte slices; SipHash would dominate.
#[derive(Default)]
struct Fnv(u64);
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}
type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

/// Raw bytes of ranks 0..FIRST_SPECIAL from tiktoken-rs's embedded o200k data.
pub fn o200k_rank_bytes() -> Result<Vec<Vec<u8>>> {
    let bpe = tiktoken_rs::o200k_harmony().map_err(|e| GgufError::Tokenizer(e.to_string()))?;
    (0..FIRST_SPECIAL)
        .map(|rank| bpe.decode_bytes(&[rank]).map_err(|e| GgufError::Tokenizer(format!("rank {rank}: {e}"))))
        .collect()
}

/// BPE over `bytes` using only ranks below `max_rank`; returns the final part boundaries.
fn bpe_parts(bytes: &[u8], max_rank: u32, ranks: &FnvMap<&[u8], u32>, bounds: &mut Vec<usize>) {
    bounds.clear();
    bounds.extend(0..=bytes.len());
    loop {
        let mut best: Option<(u32, usize)> = None;
        for i in 0..bounds.len().saturating_sub(2) {
            let piece = &bytes[bounds[i]..bounds[i + 2]];
            if let Some(&r) = ranks.get(piece)
                && r < max_rank
                && best.is_none_or(|(br, _)| r < br)
            {
                best = Some((r, i));
            }
        }
        match best {
            Some((_, i)) => {
                bounds.remove(i + 1);
            }
            None => return,
        }
    }
}

/// Merges in rank order, one per multi-byte token.
pub fn derive_merges(rank_bytes: &[Vec<u8>], table: &[char; 256]) -> Result<Vec<String>> {
    let mut ranks: FnvMap<&[u8], u32> = FnvMap::with_capacity_and_hasher(rank_bytes.len(), Default::default());
    for (rank, bytes) in rank_bytes.iter().enumerate() {
        ranks.insert(bytes.as_slice(), rank as u32);
    }
    let mut merges = Vec::with_capacity(rank_bytes.len());
    let mut bounds = Vec::new();
    for (rank, bytes) in rank_bytes.iter().enumerate() {
        if bytes.len() < 2 {
            continue;
        }
        bpe_parts(bytes, rank as u32, &ranks, &mut bounds);
        if bounds.len() != 3 {
            return Err(GgufError::Tokenizer(format!(
                "rank {rank} ({bytes:?}) does not reduce to a single merge ({} parts)",
                bounds.len() - 1
            )));
        }
        let (left, right) = bytes.split_at(bounds[1]);
        let mut merge = bytes_to_unicode_string(left, table);
        merge.push(' ');
        merge.push_str(&bytes_to_unicode_string(right, table));
        merges.push(merge);
    }
    Ok(merges)
}

/// Build the full 201,088-entry vocabulary with token types and merges.
pub fn harmony_vocab() -> Result<HarmonyVocab> {
    let _span = tracing::debug_span!("harmony_vocab").entered();
    let rank_bytes = o200k_rank_bytes()?;
    let table = byte_to_unicode();
    let merges = derive_merges(&rank_bytes, &table)?;
    let mut tokens = Vec::with_capacity(VOCAB_SIZE);
    let mut token_types = Vec::with_capacity(VOCAB_SIZE);
    for bytes in &rank_bytes {
        tokens.push(bytes_to_unicode_string(bytes, &table));
        token_types.push(TOKEN_TYPE_NORMAL);
    }
    for id in FIRST_SPECIAL..VOCAB_SIZE as u32 {
        tokens.push(special_token_text(id).ok_or_else(|| GgufError::Tokenizer(format!("no text for special {id}")))?);
        token_types.push(TOKEN_TYPE_CONTROL);
    }
    Ok(HarmonyVocab { tokens, token_types, merges })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_gpt2() {
        let t = byte_to_unicode();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xad], 'Ń');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn bpe_parts_on_toy_ranks() {
        // ranks: a=0 b=1 c=2 ab=3 abc=4 bc=5
        let words: Vec<&[u8]> = vec![b"a", b"b", b"c", b"ab", b"abc", b"bc"];
        let mut ranks: FnvMap<&[u8], u32> = FnvMap::default();
        for (i, w) in words.iter().enumerate() {
            ranks.insert(w, i as u32);
        }
        let mut bounds = Vec::new();
        bpe_parts(b"abc", 4, &ranks, &mut bounds);
        assert_eq!(bounds, vec![0, 2, 3]); // ab + c, because ab (3) outranks bc (5)
        let owned: Vec<Vec<u8>> = words.iter().map(|w| w.to_vec()).collect();
        let merges = derive_merges(&owned, &byte_to_unicode()).unwrap();
        assert_eq!(merges, vec!["a b", "ab c", "b c"]);
    }

    #[test]
    fn specials_are_named_like_harmony() {
        assert_eq!(special_token_text(200_006).unwrap(), "<|start|>");
        assert_eq!(special_token_text(200_000).unwrap(), "<|reserved_200000|>");
        assert_eq!(special_token_text(201_087).unwrap(), "<|reserved_201087|>");
        assert!(special_token_text(201_088).is_none());
        assert!(special_token_text(5).is_none());
    }
}

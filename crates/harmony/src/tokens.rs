//! Special token ids of `o200k_harmony`. Everything from [`START_OF_TEXT`] up to [`VOCAB_SIZE`] is special;
//! ids below it are ordinary BPE tokens.

pub const START_OF_TEXT: u32 = 199998;
pub const END_OF_TEXT: u32 = 199999;
pub const RETURN: u32 = 200002;
pub const CONSTRAIN: u32 = 200003;
pub const CHANNEL: u32 = 200005;
pub const START: u32 = 200006;
pub const END: u32 = 200007;
pub const MESSAGE: u32 = 200008;
pub const CALL: u32 = 200012;
/// The model's vocabulary size (ids `0..VOCAB_SIZE`).
pub const VOCAB_SIZE: usize = 201088;

/// Generation stops here; NOT on END, which closes the analysis message.
pub const STOP: [u32; 3] = [RETURN, CALL, END_OF_TEXT];

/// First id of the special range; all ordinary BPE ranks are below it.
pub const FIRST_SPECIAL: u32 = START_OF_TEXT;

/// True for ids that are formatting/reserved tokens rather than text.
pub fn is_special(id: u32) -> bool {
    (FIRST_SPECIAL..VOCAB_SIZE as u32).contains(&id)
}

/// True for ids outside the model's vocabulary (a corrupt or foreign token stream).
pub fn is_out_of_vocab(id: u32) -> bool {
    id as usize >= VOCAB_SIZE
}

/// Text forms of the specials that appear inside decoded headers.
pub(crate) const CHANNEL_TEXT: &str = "<|channel|>";
pub(crate) const CONSTRAIN_TEXT: &str = "<|constrain|>";

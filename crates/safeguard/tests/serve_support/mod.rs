//! Shared by `serve_remote` and `serve_stream`: a gpt-oss GGUF whose greedy output is scripted, and
//! `safeguard serve` as a child process with any arguments.
//!
//! A tiny model with random weights writes noise: no analysis, no final answer. To check that reasoning and
//! answers travel intact (through a remote hop, or a token stream) the real engine must write a real harmony
//! completion. [`write_scripted_model`] builds weights that do exactly that: every layer adds nothing to the
//! residual except one attention head, so the next token is a function of the current token alone (token
//! embedding → output row), plus one bit of context from that head, "was the `final` header written in the last
//! few tokens", which is what tells the two `<|message|>` tokens of a completion apart.
#![allow(dead_code)]

#[path = "../serve_common.rs"]
mod serve_common;
pub use serve_common::ServeProcess;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safeguard_gguf::gpt_oss::{self, DtypePlan};
use safeguard_gguf::{GgmlType, GgufWriter, TensorSpec, TinyConfig};
use safeguard_harmony::{Tokenizer, tokens};

/// What the scripted model writes after `<|start|>assistant`, whatever the prompt.
pub struct Script {
    pub analysis: &'static str,
    pub final_text: &'static str,
}

/// The model reasons that the text is harmless and answers `0`, in harmony's two-message shape.
pub const SAFE_SCRIPT: Script = Script {
    analysis: "The message greets a colleague about lunch plans and promotes no product, so it violates nothing here.",
    final_text: "0",
};

/// The sliding window of the attention layer that carries the context bit, in tokens.
const WINDOW: u32 = 3;

/// Writes a gpt-oss GGUF (real vocabulary, tiny shapes) that greedily writes
/// `<|channel|>analysis<|message|>{analysis}<|end|><|start|> assistant<|channel|>final<|message|>{final}<|return|>`.
///
/// The next token is a function of the current one, except at the two tokens that occur twice:
/// `<|channel|>` is followed by `final` when ` assistant` (the second header's role, spelled apart from the
/// prompt's `assistant`) is in the attention window, and `<|message|>` by the answer when `final` is.
pub fn write_scripted_model(path: &Path, script: &Script) {
    let tokenizer = Tokenizer::shared();
    let encode = |text: &str| tokenizer.encode_ordinary(text);
    let single = |text: &str| -> u32 {
        let ids = encode(text);
        assert_eq!(ids.len(), 1, "{text:?} must be one token, got {ids:?}");
        ids[0]
    };
    let analysis_body = encode(script.analysis);
    let final_body = encode(script.final_text);
    let (role, second_role, analysis, final_word) =
        (single("assistant"), single(" assistant"), single("analysis"), single("final"));

    let mut chain = vec![role, tokens::CHANNEL, analysis, tokens::MESSAGE];
    chain.extend(&analysis_body);
    chain.extend([tokens::END, tokens::START, second_role]);
    let second_channel_at = chain.len();
    chain.extend([tokens::CHANNEL, final_word]);
    let second_message_at = chain.len();
    chain.push(tokens::MESSAGE);
    chain.extend(&final_body);
    chain.push(tokens::RETURN);
    assert_eq!(
        tokenizer.decode_lossy(&chain[second_channel_at - 1..=second_message_at]),
        " assistant<|channel|>final<|message|>"
    );

    // Each token's successor; the second `<|channel|>` and `<|message|>` are the context-dependent branches.
    let mut successor: HashMap<u32, u32> = HashMap::new();
    for (at, pair) in chain.windows(2).enumerate() {
        if at == second_channel_at || at == second_message_at {
            continue;
        }
        let previous = successor.insert(pair[0], pair[1]);
        assert!(previous.is_none(), "token {} occurs twice in the script; reword it", pair[0]);
    }
    let config = TinyConfig { sliding_window: WINDOW, ..TinyConfig::with_seed(0) };
    let hp = config.hparams();
    let hidden = hp.n_embd as usize;
    // One residual dimension per token that is ever current, plus one per context bit.
    let mut dims: HashMap<u32, usize> = HashMap::new();
    for &token in successor.keys() {
        let next = dims.len();
        dims.entry(token).or_insert(next);
    }
    let (role_bit, final_bit) = (dims.len(), dims.len() + 1);
    assert!(final_bit < hidden, "script too long for a {hidden}-wide model: {} tokens", dims.len());

    let plan = DtypePlan {
        embeddings: GgmlType::F32,
        output: GgmlType::F32,
        attention: GgmlType::F32,
        experts: GgmlType::F32,
    };
    let layout = gpt_oss::tensor_layout(&hp, &plan);
    let mut metadata = hp.metadata("safeguard scripted gpt-oss");
    metadata.extend(gpt_oss::tokenizer_metadata(safeguard_gguf::vocab::harmony_vocab().expect("vocab")));
    let specs: Vec<TensorSpec> = layout.iter().map(|(s, _)| s.clone()).collect();
    let mut writer = GgufWriter::create(path, &metadata, specs).expect("create gguf");
    let q_width = (hp.n_head * hp.head_dim) as usize;
    // Logit scale: the winning row scores ~70-100 against at most ~35 for any other, so greedy never hesitates.
    let strong = 10.0_f32;
    // An RMS-normed one-hot arrives as sqrt(hidden); this value weight turns it back into 1.0.
    let unit = 1.0 / (hidden as f32).sqrt();
    for (spec, _) in &layout {
        let n = spec.n_elements() as usize;
        let name = spec.name.as_str();
        let mut values = vec![0.0_f32; n];
        if name == "token_embd.weight" {
            for (&token, &dim) in &dims {
                values[token as usize * hidden + dim] = 1.0;
            }
        } else if name == "output.weight" {
            for (&token, &next) in &successor {
                values[next as usize * hidden + dims[&token]] += strong;
            }
            // A branch: by default the first successor wins by a little; its context bit swings it to the second.
            let mut branch = |at: u32, first: u32, second: u32, bit: usize| {
                let at = dims[&at];
                values[first as usize * hidden + at] = strong;
                values[first as usize * hidden + bit] = -strong;
                values[second as usize * hidden + at] = strong - 1.0;
                values[second as usize * hidden + bit] = strong;
            };
            branch(tokens::CHANNEL, analysis, final_word, role_bit);
            branch(tokens::MESSAGE, analysis_body[0], final_body[0], final_bit);
        } else if name.ends_with("norm.weight") {
            values.fill(1.0);
        } else if name.ends_with("attn_sinks.weight") {
            // No attention mass to the sink: the heads average exactly their window.
            values.fill(-30.0);
        } else if name.ends_with("attn_v.weight") {
            // Values 0 and 1 of kv head 0 read the two markers.
            values[dims[&second_role]] = unit;
            values[hidden + dims[&final_word]] = unit;
        } else if name.ends_with("attn_output.weight") {
            // Head 0 averages its window (1/WINDOW per marker in it); each bit arrives at 0.5.
            values[role_bit * q_width] = 0.5 * WINDOW as f32;
            values[final_bit * q_width + 1] = 0.5 * WINDOW as f32;
        }
        // Queries, keys, biases and experts stay zero: uniform attention, and feed-forward layers that add nothing.
        writer.write_tensor_f32(name, &values).expect("write tensor");
    }
    writer.finish().expect("finish gguf");
}

pub fn scripted_model() -> &'static Path {
    static MODEL: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("scripted.gguf");
            write_scripted_model(&path, &SAFE_SCRIPT);
            (dir, path)
        })
        .1
}

/// `safeguard serve` with the given arguments on 127.0.0.1:0, without keys (loopback only), killed on drop.
pub fn serve(data_dir: &Path, args: &[&str]) -> ServeProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_safeguard"));
    command
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--rate-limit", "0", "--data-dir"])
        .arg(data_dir)
        .env_remove("SAFEGUARD_ADMIN_KEY")
        .env_remove("SAFEGUARD_DATABASE_URL");
    ServeProcess::spawn(command)
}

//! The harmony format: render policy + content to o200k_harmony token ids, parse completions into channels.
//!
//! All text (policy, content, role names) is tokenized with `encode_ordinary`; the only special tokens in a
//! rendered prompt are the ones the renderer places itself. Content that spells out `<|end|><|start|>developer`
//! therefore stays text and cannot change the prompt's structure.

mod content;
mod parse;
mod render;
mod tokenizer;
pub mod tokens;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use content::{ChatMessage, Content, judged_text, user_message_text, written_parts};
pub use parse::{
    CompletionEnd, MessageClose, ParsedCompletion, ParsedMessage, StreamDelta, StreamParser, parse_completion,
};
pub use render::{
    PromptOptions, PromptPrefix, RenderedPrompt, developer_message_text, render_prefix, render_prompt,
    render_prompt_text, suffix_framing_len, suffix_len, system_message_text, validate_date,
};
pub use tokenizer::Tokenizer;

/// Reasoning effort, written into the system message as `Reasoning: {effort}`. Ordered from least to most
/// effort, so that "at least this effort" is a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effort {
    Low,
    #[default]
    Medium,
    High,
}

impl Effort {
    pub const ALL: [Effort; 3] = [Effort::Low, Effort::Medium, Effort::High];

    pub fn as_str(self) -> &'static str {
        match self {
            Effort::Low => "low",
            Effort::Medium => "medium",
            Effort::High => "high",
        }
    }
}

impl fmt::Display for Effort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Effort {
    type Err = HarmonyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Ok(Effort::Low),
            "medium" => Ok(Effort::Medium),
            "high" => Ok(Effort::High),
            _ => Err(HarmonyError::InvalidEffort(s.to_string())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HarmonyError {
    #[error("invalid date {0:?}: expected a real calendar date written YYYY-MM-DD")]
    InvalidDate(String),
    #[error("invalid reasoning effort {0:?}: expected low, medium or high")]
    InvalidEffort(String),
    #[error("the instructions (policy) are empty")]
    EmptyInstructions,
    #[error("the conversation has no messages, so there is nothing to classify")]
    EmptyConversation,
}

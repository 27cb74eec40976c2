use crate::content::{Content, user_message_text};
use crate::tokenizer::Tokenizer;
use crate::tokens::{END, MESSAGE, START};
use crate::{Effort, HarmonyError};

/// Options of the system message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptOptions {
    pub effort: Effort,
    /// `YYYY-MM-DD`; without it the system message has no "Current date" line, exactly as openai-harmony renders
    /// a `SystemContent` with no date. Kept explicit so that prompts are reproducible.
    pub date: Option<String>,
}

impl PromptOptions {
    pub fn new(effort: Effort) -> Self {
        Self { effort, date: None }
    }

    pub fn with_date(mut self, date: impl Into<String>) -> Self {
        self.date = Some(date.into());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPrompt {
    pub tokens: Vec<u32>,
    /// Tokens [0, prefix_len) are system + developer messages: identical for every item with the same
    /// instructions/effort/date, so engines can cache them.
    pub prefix_len: usize,
}

impl RenderedPrompt {
    pub fn prefix(&self) -> &[u32] {
        &self.tokens[..self.prefix_len]
    }

    pub fn suffix(&self) -> &[u32] {
        &self.tokens[self.prefix_len..]
    }
}

/// The identity line openai-harmony's `SystemContent` defaults to; the model was trained with it.
const MODEL_IDENTITY: &str = "You are ChatGPT, a large language model trained by OpenAI.";
const KNOWLEDGE_CUTOFF: &str = "2024-06";
const CHANNELS_LINE: &str =
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.";

/// The system message body, as openai-harmony renders `SystemContent::new()` with this effort and date.
pub fn system_message_text(opts: &PromptOptions) -> Result<String, HarmonyError> {
    let mut top = format!("{MODEL_IDENTITY}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}");
    if let Some(date) = &opts.date {
        validate_date(date)?;
        top.push_str("\nCurrent date: ");
        top.push_str(date);
    }
    Ok(format!("{top}\n\nReasoning: {}\n\n{CHANNELS_LINE}", opts.effort))
}

/// The developer message body: the policy goes in as harmony's `# Instructions` section.
pub fn developer_message_text(instructions: &str) -> String {
    format!("# Instructions\n\n{instructions}")
}

/// System + developer messages: the cacheable prefix shared by every item judged under the same policy.
pub fn render_prefix(instructions: &str, opts: &PromptOptions) -> Result<Vec<u32>, HarmonyError> {
    if instructions.trim().is_empty() {
        return Err(HarmonyError::EmptyInstructions);
    }
    let system = system_message_text(opts)?;
    let tokenizer = Tokenizer::shared();
    let mut tokens = Vec::with_capacity(64 + instructions.len() / 3);
    push_message(tokenizer, &mut tokens, "system", &system);
    push_message(tokenizer, &mut tokens, "developer", &developer_message_text(instructions));
    Ok(tokens)
}

/// The full prompt for one item, ending with `<|start|>assistant` so the model writes the next message.
pub fn render_prompt(
    instructions: &str,
    content: &Content,
    opts: &PromptOptions,
) -> Result<RenderedPrompt, HarmonyError> {
    validate_content(content)?;
    PromptPrefix::new(instructions, opts)?.render(content)
}

/// The rendered system + developer messages, for judging many items under one policy without re-tokenizing
/// the policy each time. `prefix.render(content)` equals `render_prompt(instructions, content, opts)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPrefix {
    tokens: Vec<u32>,
}

impl PromptPrefix {
    pub fn new(instructions: &str, opts: &PromptOptions) -> Result<Self, HarmonyError> {
        Ok(Self { tokens: render_prefix(instructions, opts)? })
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn render(&self, content: &Content) -> Result<RenderedPrompt, HarmonyError> {
        validate_content(content)?;
        let tokenizer = Tokenizer::shared();
        let user = tokenizer.encode_ordinary(&user_message_text(content));
        let mut tokens = Vec::with_capacity(self.tokens.len() + user.len() + 8);
        tokens.extend_from_slice(&self.tokens);
        tokens.push(START);
        tokens.extend(tokenizer.encode_ordinary("user"));
        tokens.push(MESSAGE);
        tokens.extend(user);
        tokens.push(END);
        tokens.push(START);
        tokens.extend(tokenizer.encode_ordinary("assistant"));
        Ok(RenderedPrompt { tokens, prefix_len: self.tokens.len() })
    }
}

/// How many tokens [`PromptPrefix::render`] adds after the prefix for `content`: its user message and the
/// framing around it ([`suffix_framing_len`]). Counted without building the prompt, so that the size of a prompt
/// can be checked per policy from a cached prefix length and one count of the content.
pub fn suffix_len(content: &Content) -> Result<usize, HarmonyError> {
    validate_content(content)?;
    Ok(Tokenizer::shared().count(&user_message_text(content)) + suffix_framing_len())
}

/// The tokens of a prompt's suffix that are not the user message's text: the user message's header and end, and
/// the assistant header the model writes after.
pub fn suffix_framing_len() -> usize {
    let tokenizer = Tokenizer::shared();
    4 + tokenizer.count("user") + tokenizer.count("assistant")
}

/// The same prompt as [`render_prompt`], decoded for people (special tokens appear as `<|start|>` etc.).
pub fn render_prompt_text(instructions: &str, content: &Content, opts: &PromptOptions) -> Result<String, HarmonyError> {
    let rendered = render_prompt(instructions, content, opts)?;
    Ok(Tokenizer::shared().decode_lossy(&rendered.tokens))
}

/// Every piece of text goes through `encode_ordinary`; only the structure tokens pushed here are special.
fn push_message(tokenizer: &Tokenizer, into: &mut Vec<u32>, role: &str, body: &str) {
    into.push(START);
    into.extend(tokenizer.encode_ordinary(role));
    into.push(MESSAGE);
    into.extend(tokenizer.encode_ordinary(body));
    into.push(END);
}

fn validate_content(content: &Content) -> Result<(), HarmonyError> {
    if let Content::Conversation { messages } = content
        && messages.is_empty()
    {
        return Err(HarmonyError::EmptyConversation);
    }
    Ok(())
}

/// Accepts exactly `YYYY-MM-DD` naming a real calendar day.
pub fn validate_date(date: &str) -> Result<(), HarmonyError> {
    let invalid = || HarmonyError::InvalidDate(date.to_string());
    let bytes = date.as_bytes();
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return Err(invalid());
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = &bytes[range];
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        part.iter().try_fold(0u32, |acc, d| acc.checked_mul(10)?.checked_add(u32::from(d - b'0')))
    };
    let (Some(year), Some(month), Some(day)) = (number(0..4), number(5..7), number(8..10)) else {
        return Err(invalid());
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(invalid()),
    };
    if year == 0 || day == 0 || day > days_in_month {
        return Err(invalid());
    }
    Ok(())
}

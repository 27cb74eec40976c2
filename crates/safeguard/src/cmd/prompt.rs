//! `safeguard prompt`: show the exact harmony prompt (text and token ids) a policy and content produce.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use safeguard_harmony::{Content, Effort, PromptOptions, Tokenizer, render_prompt};
use safeguard_policy::Policy;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("content").required(true).args(["text", "text_file", "content_file"])))]
pub struct Args {
    /// Policy file (Markdown with optional front matter); its body becomes the developer instructions.
    #[arg(long)]
    policy: PathBuf,
    /// The content to classify, as plain text.
    #[arg(long)]
    text: Option<String>,
    /// Read the plain-text content from a file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    /// Read the content as a JSON Content object (`{"kind": "response", "prompt": "...", "response": "..."}`;
    /// kinds: text, prompt, response, conversation) from a file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    content_file: Option<PathBuf>,
    /// Reasoning effort written into the system message.
    #[arg(long, default_value_t = Effort::Medium, value_name = "low|medium|high")]
    effort: Effort,
    /// Conversation date for the system message (YYYY-MM-DD); omitted from the prompt when not given.
    #[arg(long, value_name = "YYYY-MM-DD")]
    date: Option<String>,
    /// `json`: {"text", "tokens", "prefix_len", ...}; `text`: the prompt as readable text.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Json,
    Text,
}

#[derive(serde::Serialize)]
struct Output<'a> {
    text: String,
    tokens: &'a [u32],
    prefix_len: usize,
    token_count: usize,
    policy: &'a str,
    policy_hash: String,
    effort: Effort,
    date: Option<&'a str>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let policy = Policy::load(&args.policy).with_context(|| format!("cannot load policy {}", args.policy.display()))?;
    let content = read_content(&args)?;
    let opts = PromptOptions { effort: args.effort, date: args.date.clone() };
    let rendered = render_prompt(&policy.body, &content, &opts).context("cannot render the prompt")?;
    let text = Tokenizer::shared().decode_lossy(&rendered.tokens);

    let mut stdout = super::Stdout::lock();
    match args.format {
        Format::Json => {
            let output = Output {
                text,
                tokens: &rendered.tokens,
                prefix_len: rendered.prefix_len,
                token_count: rendered.tokens.len(),
                policy: &policy.meta.name,
                policy_hash: policy.hash.to_string(),
                effort: args.effort,
                date: args.date.as_deref(),
            };
            serde_json::to_writer(&mut stdout, &output)?;
            writeln!(stdout)?;
        }
        Format::Text => writeln!(stdout, "{text}")?,
    }
    Ok(ExitCode::SUCCESS)
}

fn read_content(args: &Args) -> anyhow::Result<Content> {
    if let Some(text) = &args.text {
        return Ok(Content::text(text.clone()));
    }
    if let Some(path) = &args.text_file {
        return Ok(Content::text(read_input(path)?));
    }
    if let Some(path) = &args.content_file {
        let json = read_input(path)?;
        return serde_json::from_str(&json).with_context(|| {
            format!(
                "{} is not a JSON Content object (expected e.g. {{\"kind\": \"text\", \"text\": \"...\"}})",
                path.display()
            )
        });
    }
    anyhow::bail!("give the content with --text, --text-file or --content-file")
}

fn read_input(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("cannot read content from stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Write the float32 logits at every position of a token sequence as a .npy array (positions × vocab),
    /// for comparison with a reference implementation.
    Logits(LogitsArgs),
}

#[derive(clap::Args)]
pub struct LogitsArgs {
    /// gpt-oss GGUF model file.
    #[arg(long)]
    pub model: PathBuf,
    /// JSON file holding the token ids: `[1, 2, 3]` or `{"tokens": [1, 2, 3]}`.
    #[arg(long)]
    pub tokens: PathBuf,
    /// Output .npy file.
    #[arg(long)]
    pub out: PathBuf,
    /// CPU threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Layers to offload to the GPU (CUDA builds): the logits of an offloaded run, to compare with the CPU's.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub gpu_layers: u32,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Logits(args) => logits(args),
    }
}

fn read_tokens(path: &PathBuf) -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let list = match &value {
        serde_json::Value::Array(_) => &value,
        serde_json::Value::Object(map) => map
            .get("tokens")
            .with_context(|| format!("{}: expected an array or an object with \"tokens\"", path.display()))?,
        _ => anyhow::bail!("{}: expected an array of token ids", path.display()),
    };
    let tokens: Vec<u32> = serde_json::from_value(list.clone())
        .with_context(|| format!("{}: token ids must be non-negative integers", path.display()))?;
    anyhow::ensure!(!tokens.is_empty(), "{}: no tokens", path.display());
    Ok(tokens)
}

#[cfg(feature = "embedded")]
fn logits(args: LogitsArgs) -> anyhow::Result<ExitCode> {
    use safeguard_engine::EngineConfig;
    use safeguard_engine::llama::LlamaEngine;

    let tokens = read_tokens(&args.tokens)?;
    let n_ctx = u32::try_from(tokens.len().next_multiple_of(256)).context("too many tokens")?;
    let config = EngineConfig {
        threads: args.threads,
        n_ctx,
        max_sequences: 1,
        n_gpu_layers: args.gpu_layers,
        ..EngineConfig::default()
    };
    let engine = LlamaEngine::load(&args.model, config)?;
    let rows = safeguard_engine::debug::logits(&engine, &tokens)?;
    let file = std::fs::File::create(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    safeguard_engine::debug::write_npy_rows(&mut out, &rows)
        .and_then(|()| std::io::Write::flush(&mut out))
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("wrote {} × {} float32 logits to {}", rows.len(), rows.first().map_or(0, Vec::len), args.out.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "embedded"))]
fn logits(args: LogitsArgs) -> anyhow::Result<ExitCode> {
    let _ = read_tokens(&args.tokens)?;
    anyhow::bail!("this safeguard was built without the embedded engine (cargo feature `embedded`)")
}

//! `safeguard models`: generate, inspect, convert and download model files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use safeguard_gguf::{GgmlType, GgufFile, GptOssHparams, TinyConfig};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Write a random-weight gpt-oss GGUF with the real o200k_harmony vocabulary (for tests and benchmarks).
    Tiny(TinyArgs),
    /// Print a GGUF file's architecture, hyper-parameters, tensor count and size.
    Inspect(InspectArgs),
    /// Download a GGUF model from the Hugging Face hub (resumable, sha256-verified).
    Pull(PullArgs),
    /// Convert a Hugging Face gpt-oss checkpoint directory (config.json + safetensors) to GGUF.
    Convert(ConvertArgs),
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// gpt-oss-safeguard-20b, gpt-oss-safeguard-120b, or <owner>/<repo>/<file.gguf>.
    name: String,
    #[arg(long, default_value = "models", value_name = "DIR")]
    dir: PathBuf,
    #[arg(long, default_value = "main")]
    revision: String,
    /// Expected sha256 of the file (otherwise the hub's LFS etag is used when it has one).
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutType {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(clap::Args)]
pub struct ConvertArgs {
    #[arg(value_name = "HF_DIR")]
    hf_dir: PathBuf,
    #[arg(long, value_name = "FILE.gguf")]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Storage for non-expert matrices (MXFP4 experts stay MXFP4; norms and biases stay f32).
    #[arg(long, value_enum, default_value_t = OutType::F16)]
    outtype: OutType,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// hidden 64, 2 layers, 4 experts: loads in milliseconds.
    Tiny,
    /// gpt-oss-20b's exact shapes and storage types (about 12 GB).
    #[value(name = "20b")]
    Gpt20b,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExpertType {
    F32,
    Mxfp4,
}

#[derive(clap::Args)]
pub struct TinyArgs {
    #[arg(long, value_name = "FILE.gguf")]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = Shape::Tiny)]
    shape: Shape,
    /// Storage type of the expert weights (tiny shape only; 20b always uses MXFP4).
    #[arg(long, value_enum, default_value_t = ExpertType::F32)]
    experts: ExpertType,
}

#[derive(clap::Args)]
pub struct InspectArgs {
    #[arg(value_name = "FILE.gguf")]
    file: PathBuf,
    /// Also list every tensor with its shape and type.
    #[arg(long)]
    tensors: bool,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Tiny(args) => tiny(args),
        Command::Inspect(args) => inspect(args),
        Command::Pull(args) => pull(args),
        Command::Convert(args) => convert(args),
    }
}

fn pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress_bar = bar.clone();
    let opts = safeguard_gguf::hub::PullOptions {
        revision: args.revision,
        sha256: args.sha256,
        progress: Some(Box::new(move |p: safeguard_gguf::hub::Progress| {
            if let Some(total) = p.total {
                progress_bar.set_length(total);
            }
            progress_bar.set_position(p.downloaded);
        })),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = runtime.block_on(safeguard_gguf::hub::pull(&args.name, &args.dir, &opts));
    bar.finish_and_clear();
    let pulled = result.with_context(|| format!("pulling {}", args.name))?;
    let verified = match &pulled.sha256 {
        Some(sha) => format!("sha256 {sha}"),
        None if pulled.already_present => "not checked again (pass --sha256 to verify it)".to_string(),
        None => "no checksum published; not verified".to_string(),
    };
    let note = if pulled.already_present { " (already present)" } else { "" };
    println!("{}{note}: {} bytes, {verified}", pulled.path.display(), pulled.bytes);
    Ok(ExitCode::SUCCESS)
}

/// A model file is gigabytes of someone's download: one of random weights must not replace it unasked.
fn refuse_existing(out: &Path, force: bool) -> anyhow::Result<()> {
    if !force && out.exists() {
        bail!("refusing to overwrite {} (pass --force)", out.display());
    }
    Ok(())
}

fn convert(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    refuse_existing(&args.out, args.force)?;
    let outtype = match args.outtype {
        OutType::F32 => GgmlType::F32,
        OutType::F16 => GgmlType::F16,
        OutType::Q8_0 => GgmlType::Q8_0,
    };
    let info = safeguard_gguf::convert_hf(&args.hf_dir, &args.out, outtype)
        .with_context(|| format!("converting {}", args.hf_dir.display()))?;
    println!(
        "wrote {} ({:.1} MB, {} tensors, experts {})",
        info.out.display(),
        info.file_bytes as f64 / 1e6,
        info.tensor_count,
        if info.mxfp4_experts { "MXFP4" } else { args.outtype_name() }
    );
    Ok(ExitCode::SUCCESS)
}

impl ConvertArgs {
    fn outtype_name(&self) -> &'static str {
        match self.outtype {
            OutType::F32 => "f32",
            OutType::F16 => "f16",
            OutType::Q8_0 => "q8_0",
        }
    }
}

fn tiny(args: TinyArgs) -> anyhow::Result<ExitCode> {
    refuse_existing(&args.out, args.force)?;
    let info = match args.shape {
        Shape::Tiny => {
            let expert_type = match args.experts {
                ExpertType::F32 => GgmlType::F32,
                ExpertType::Mxfp4 => GgmlType::Mxfp4,
            };
            let config = TinyConfig { expert_type, ..TinyConfig::with_seed(args.seed) };
            safeguard_gguf::write_tiny_model(&args.out, &config)
        }
        Shape::Gpt20b => {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {msg} [{elapsed}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let result =
                safeguard_gguf::shapes20b::write_random_20b_with_progress(&args.out, args.seed, |i, n, name| {
                    bar.set_length(n as u64);
                    bar.set_position(i as u64);
                    bar.set_message(name.to_string());
                });
            bar.finish_and_clear();
            result
        }
    }
    .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {} ({:.1} MB, {} tensors, {} parameters)",
        info.path.display(),
        info.file_bytes as f64 / 1e6,
        info.tensor_count,
        info.parameter_count
    );
    Ok(ExitCode::SUCCESS)
}

fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let file = GgufFile::open(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let arch = file.architecture().context("no general.architecture")?.to_string();
    println!("file: {}", args.file.display());
    println!("gguf version: {}", file.version);
    println!("architecture: {arch}");
    if let Some(name) = file.get("general.name").and_then(|v| v.as_str()) {
        println!("name: {name}");
    }
    println!("size: {} bytes ({:.2} GB)", file.file_len(), file.file_len() as f64 / 1e9);
    println!("tensors: {}", file.tensors().len());
    println!("parameters: {}", file.parameter_count());
    let mut by_type: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for t in file.tensors() {
        let e = by_type.entry(t.type_name()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
    }
    let types: Vec<String> =
        by_type.iter().map(|(k, (n, b))| format!("{k} ×{n} ({:.1} MB)", *b as f64 / 1e6)).collect();
    println!("tensor types: {}", types.join(", "));
    if arch == safeguard_gguf::gpt_oss::ARCH {
        let hp = GptOssHparams::from_gguf(&file).context("gpt-oss hyper-parameters")?;
        println!(
            "hyper-parameters: layers {}, hidden {}, heads {}/{} kv × {}, experts {} (top {}), expert ff {}, vocab {}",
            hp.n_layer,
            hp.n_embd,
            hp.n_head,
            hp.n_head_kv,
            hp.head_dim,
            hp.n_expert,
            hp.n_expert_used,
            hp.n_ff_exp,
            hp.n_vocab
        );
        let rope = match hp.yarn_factor {
            Some(f) => format!("YaRN ×{f} over {}", hp.yarn_original_context),
            None => "plain".to_string(),
        };
        println!(
            "attention: context {}, sliding window {}, rope theta {}, rope scaling {rope}, rms eps {}",
            hp.context_length, hp.sliding_window, hp.rope_theta, hp.rms_eps
        );
    } else {
        println!("(not gpt-oss: only generic information shown)");
    }
    match (file.get_str("tokenizer.ggml.model"), file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array())) {
        (Ok(model), Some(tokens)) => println!(
            "tokenizer: {model} ({}), {} tokens",
            file.get_str("tokenizer.ggml.pre").unwrap_or("no pre-tokenizer"),
            tokens.len()
        ),
        (Ok(model), None) => println!("tokenizer: {model}, no token list"),
        _ => println!("tokenizer: none"),
    }
    if args.tensors {
        for t in file.tensors() {
            println!("  {:<36} {:<6} {:?}", t.name, t.type_name(), t.shape);
        }
    }
    if file.tensors().is_empty() {
        bail!("{} holds no tensors", args.file.display());
    }
    Ok(ExitCode::SUCCESS)
}

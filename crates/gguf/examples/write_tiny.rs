//! `cargo run -p safeguard-gguf --example write_tiny -- OUT.gguf [SEED] [EXPERTS] [DENSE]`: the
//! oracle scripts' way to get a tiny model without building the whole CLI. EXPERTS is f32 or mxfp4,
//! DENSE is f32, f16 or q8_0.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = args.next().ok_or("usage: write_tiny OUT.gguf [SEED] [EXPERTS] [DENSE]")?;
    let seed = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);
    let f32 = safeguard_gguf::GgmlType::F32;
    let expert_type = args.next().map(|s| s.parse()).transpose()?.unwrap_or(f32);
    let dense_type = args.next().map(|s| s.parse()).transpose()?.unwrap_or(f32);
    let config = safeguard_gguf::TinyConfig { expert_type, dense_type, ..safeguard_gguf::TinyConfig::with_seed(seed) };
    let info = safeguard_gguf::write_tiny_model(std::path::Path::new(&out), &config)?;
    println!("{} bytes, {} tensors", info.file_bytes, info.tensor_count);
    Ok(())
}

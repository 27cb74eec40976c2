//! Random weights in gpt-oss-20b's exact shapes and storage types (MXFP4 experts, Q8_0 attention,
//! embeddings and output, F32 norms/biases/sinks/router): a 12 GB stand-in for benchmarks, since
//! the real weights cannot be downloaded here. Streamed tensor by tensor in bounded memory.

use std::path::Path;

use crate::error::Result;
use crate::gpt_oss::{self, DtypePlan, GptOssHparams, TensorRole};
use crate::rng::SplitMix64;
use crate::tiny::{TinyModelInfo, init_scale, write_random_tensor};
use crate::types::GgmlType;
use crate::vocab;
use crate::writer::{GgufWriter, TensorSpec};

/// `progress(tensor_index, tensor_count, name)` is called before each tensor.
pub fn write_random_20b_with_progress(
    path: &Path,
    seed: u64,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<TinyModelInfo> {
    let _span = tracing::info_span!("write_random_20b", path = %path.display(), seed).entered();
    let hp = GptOssHparams::gpt_oss_20b();
    let layout = gpt_oss::tensor_layout(&hp, &DtypePlan::official());
    let mut metadata = hp.metadata(&format!("random weights in gpt-oss-20b shapes (seed {seed})"));
    metadata.push(("general.file_type".into(), 38u32.into())); // MOSTLY_MXFP4_MOE
    metadata.extend(gpt_oss::tokenizer_metadata(vocab::harmony_vocab()?));
    let specs: Vec<TensorSpec> = layout.iter().map(|(s, _)| s.clone()).collect();
    let parameter_count = specs.iter().map(|s| s.n_elements()).sum();
    let mut writer = GgufWriter::create(path, &metadata, specs)?;
    for (i, (spec, role)) in layout.iter().enumerate() {
        progress(i, layout.len(), &spec.name);
        match spec.ty {
            GgmlType::Mxfp4 | GgmlType::Q8_0 => write_random_blocks(&mut writer, seed, spec, *role)?,
            _ => write_random_tensor(&mut writer, seed, spec, *role)?,
        }
    }
    let file_bytes = writer.finish()?;
    Ok(TinyModelInfo { path: path.to_path_buf(), file_bytes, tensor_count: layout.len(), parameter_count, hparams: hp })
}

/// Random quantized blocks written directly, with scales chosen for the role's spread: drawing 21 billion
/// normals and quantizing them took over ten minutes on 16 cores, and a speed benchmark only needs the
/// shapes, the storage types and weights of a plausible magnitude.
fn write_random_blocks(writer: &mut GgufWriter, seed: u64, spec: &TensorSpec, role: TensorRole) -> Result<()> {
    const BLOCKS_PER_CHUNK: usize = 1 << 16;
    let (_, std) = init_scale(role);
    let (block_bytes, header): (usize, Vec<u8>) = match spec.ty {
        // Scale d with q uniform in [-127, 127]: std = d · 127 / √3.
        GgmlType::Q8_0 => (34, half::f16::from_f32(std * 3f32.sqrt() / 127.0).to_le_bytes().to_vec()),
        // E8M0 scale e: ggml's doubled FP4 codes (0, 1, 2, 3, 4, 6, 8, 12, signed) have an RMS of 5.85 and
        // are multiplied by 2^(e - 128).
        _ => (17, vec![(128.0 + (std / 5.85).log2().round()).clamp(1.0, 254.0) as u8]),
    };
    let blocks = (spec.n_elements() / 32) as usize;
    let mut g = SplitMix64::for_stream(seed, &spec.name);
    let mut chunk = Vec::with_capacity(BLOCKS_PER_CHUNK * block_bytes);
    let mut done = 0;
    while done < blocks {
        let n = (blocks - done).min(BLOCKS_PER_CHUNK);
        chunk.clear();
        for _ in 0..n {
            chunk.extend_from_slice(&header);
            let payload = block_bytes - header.len();
            let mut filled = 0;
            while filled < payload {
                let word = g.next_u64().to_le_bytes();
                let take = (payload - filled).min(8);
                chunk.extend_from_slice(&word[..take]);
                filled += take;
            }
        }
        if spec.ty == GgmlType::Q8_0 {
            // -128 would fall outside the symmetric range ggml's quantizer produces.
            for block in chunk.chunks_mut(block_bytes) {
                block[2..].iter_mut().filter(|b| **b == 0x80).for_each(|b| *b = 0x81);
            }
        }
        writer.write_tensor_bytes(&spec.name, &chunk)?;
        done += n;
    }
    Ok(())
}

pub fn write_random_20b(path: &Path, seed: u64) -> Result<TinyModelInfo> {
    write_random_20b_with_progress(path, seed, |_, _, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_blocks_have_the_role_spread_and_valid_codes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks.gguf");
        let role = TensorRole::Matrix { fan_in: 2880 };
        let specs = vec![
            TensorSpec::new("q8", &[2880, 64], GgmlType::Q8_0),
            TensorSpec::new("mxfp4", &[2880, 64, 2], GgmlType::Mxfp4),
        ];
        let mut writer = GgufWriter::create(&path, &[], specs.clone()).unwrap();
        for spec in &specs {
            write_random_blocks(&mut writer, 7, spec, role).unwrap();
        }
        writer.finish().unwrap();

        let file = crate::reader::GgufFile::open(&path).unwrap();
        let (_, want) = init_scale(role);
        for spec in &specs {
            let values = file.tensor_f32(&spec.name).unwrap();
            assert_eq!(values.len() as u64, spec.n_elements());
            let rms = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
            // Q8_0 scales are exact; an E8M0 scale is a power of two, so within a factor of √2.
            assert!(rms > want / 1.5 && rms < want * 1.5, "{}: rms {rms}, role spread {want}", spec.name);
        }
        let q8 = file.tensor_bytes(file.tensor("q8").unwrap());
        assert!(q8.chunks(34).all(|block| !block[2..].contains(&0x80)), "Q8_0 code -128 written");
    }

    #[test]
    fn layout_matches_gpt_oss_20b() {
        let hp = GptOssHparams::gpt_oss_20b();
        let layout = gpt_oss::tensor_layout(&hp, &DtypePlan::official());
        assert_eq!(layout.len(), 2 + 24 * 19 + 1);
        let get = |n: &str| layout.iter().find(|(s, _)| s.name == n).map(|(s, _)| s.clone()).unwrap();
        assert_eq!(
            get("blk.0.ffn_gate_exps.weight"),
            TensorSpec::new("blk.0.ffn_gate_exps.weight", &[2880, 2880, 32], GgmlType::Mxfp4)
        );
        assert_eq!(get("blk.23.ffn_down_exps.weight").shape, vec![2880, 2880, 32]);
        assert_eq!(get("blk.0.attn_q.weight"), TensorSpec::new("blk.0.attn_q.weight", &[2880, 4096], GgmlType::Q8_0));
        assert_eq!(get("blk.0.attn_k.weight").shape, vec![2880, 512]);
        assert_eq!(get("blk.0.attn_output.weight").shape, vec![4096, 2880]);
        assert_eq!(get("blk.0.attn_sinks.weight"), TensorSpec::new("blk.0.attn_sinks.weight", &[64], GgmlType::F32));
        assert_eq!(get("blk.0.ffn_gate_inp.weight").ty, GgmlType::F32);
        assert_eq!(get("token_embd.weight"), TensorSpec::new("token_embd.weight", &[2880, 201_088], GgmlType::Q8_0));
        // 20.9B parameters, as the model card says.
        let params: u64 = layout.iter().map(|(s, _)| s.n_elements()).sum();
        assert!((20_900_000_000..20_930_000_000).contains(&params), "{params}");
        // Tensor data alone is ~12.1 GB, the size of the official MXFP4 GGUF.
        let bytes = gpt_oss::gpt_oss_20b_file_bytes().unwrap();
        assert!((12_000_000_000..12_200_000_000).contains(&bytes), "{bytes}");
    }
}

//! Random weights in gpt-oss-20b's exact shapes and storage types (MXFP4 experts, Q8_0 attention,
//! embeddings and output, F32 norms/biases/sinks/router): a 12 GB stand-in for benchmarks, since
//! the real weights cannot be downloaded here. Streamed tensor by tensor in bounded memory.

use std::path::Path;

use crate::error::Result;
use crate::gpt_oss::{self, DtypePlan, GptOssHparams};
use crate::tiny::{TinyModelInfo, write_random_tensor};
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
        write_random_tensor(&mut writer, seed, spec, *role)?;
    }
    let file_bytes = writer.finish()?;
    Ok(TinyModelInfo { path: path.to_path_buf(), file_bytes, tensor_count: layout.len(), parameter_count, hparams: hp })
}

pub fn write_random_20b(path: &Path, seed: u64) -> Result<TinyModelInfo> {
    write_random_20b_with_progress(path, seed, |_, _, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::GgmlType;

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

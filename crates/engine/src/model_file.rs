//! Reads a GGUF file's header and tensor table before llama.cpp sees it, so that a missing, foreign, truncated
//! or non-gpt-oss file gets a clear error from us instead of a null pointer from C. Also feeds the bandwidth
//! estimate of `safeguard bench`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::EngineError;

pub const GPT_OSS_ARCHITECTURE: &str = "gpt-oss";
const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Far more than any real header needs; stops a corrupt length from allocating gigabytes.
const MAX_STRING_BYTES: u64 = 16 << 20;
const MAX_DIMS: u32 = 8;
const MAX_TENSORS: u64 = 1 << 16;
const MAX_METADATA_ENTRIES: u64 = 1 << 16;
const GGUF_TYPE_UINT32: u32 = 4;
const GGUF_TYPE_STRING: u32 = 8;
/// Metadata llama.cpp reads as arrays of strings, asserting the type.
const TOKENIZER_STRING_ARRAYS: [&str; 2] = ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"];

#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// Arrays (e.g. the tokenizer's 200k strings) are skipped, only their shape is kept.
    Array {
        elem_type: u32,
        len: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: dims[0] is the row length.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset inside the data section.
    pub offset: u64,
    /// None for ggml types this reader does not know the block size of.
    pub n_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ModelFileInfo {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: u64,
    pub file_len: u64,
}

/// Bytes of weights one decoded token reads, by part (MoE: only the routed experts count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BytesPerToken {
    pub attention_and_dense: u64,
    pub routed_experts: u64,
    pub output_matrix: u64,
    pub embedding_row: u64,
}

impl BytesPerToken {
    pub fn total(&self) -> u64 {
        self.attention_and_dense + self.routed_experts + self.output_matrix + self.embedding_row
    }
}

impl ModelFileInfo {
    pub fn architecture(&self) -> Option<&str> {
        self.meta_str("general.architecture")
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(MetaValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        match self.metadata.get(key) {
            Some(MetaValue::Uint(v)) => Some(*v),
            Some(MetaValue::Int(v)) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().filter_map(|t| t.n_bytes).fold(0u64, u64::saturating_add)
    }

    /// What a single-sequence decode step streams from memory: every weight except the unrouted experts and
    /// all but one embedding row. The floor on decode latency is this divided by the memory bandwidth.
    pub fn bytes_read_per_token(&self) -> BytesPerToken {
        let arch = self.architecture().unwrap_or(GPT_OSS_ARCHITECTURE);
        let experts = self.meta_u64(&format!("{arch}.expert_count")).unwrap_or(1).max(1);
        let used = self.meta_u64(&format!("{arch}.expert_used_count")).unwrap_or(experts).min(experts);
        let mut out = BytesPerToken::default();
        for t in &self.tensors {
            let Some(bytes) = t.n_bytes else { continue };
            if t.name.starts_with("token_embd.") {
                let rows = t.dims.get(1).copied().unwrap_or(1).max(1);
                out.embedding_row += bytes / rows;
            } else if t.name.starts_with("output.") {
                out.output_matrix += bytes;
            } else if t.name.contains("_exps.") {
                // In u128: `used` comes from the file, and a product of two u64s may not fit one.
                let share = u128::from(bytes) * u128::from(used) / u128::from(experts);
                out.routed_experts = out.routed_experts.saturating_add(u64::try_from(share).unwrap_or(u64::MAX));
            } else {
                out.attention_and_dense += bytes;
            }
        }
        out
    }
}

/// (elements per block, bytes per block) of the ggml types found in gpt-oss files and common quantizations.
fn ggml_block(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),     // F32
        1 => (1, 2),     // F16
        2 => (32, 18),   // Q4_0
        3 => (32, 20),   // Q4_1
        6 => (32, 22),   // Q5_0
        7 => (32, 24),   // Q5_1
        8 => (32, 34),   // Q8_0
        9 => (32, 36),   // Q8_1
        10 => (256, 84), // Q2_K
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        24 => (1, 1), // I8
        25 => (1, 2),
        26 => (1, 4),
        27 => (1, 8),
        28 => (1, 8),   // F64
        30 => (1, 2),   // BF16
        39 => (32, 17), // MXFP4
        _ => return None,
    })
}

/// Reads the header and tensor table and checks that every tensor's data lies inside the file.
pub fn inspect(path: &Path) -> Result<ModelFileInfo, EngineError> {
    let file = File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => EngineError::ModelNotFound { path: path.to_path_buf() },
        _ => EngineError::Io { path: path.to_path_buf(), source },
    })?;
    let io_err = |source| EngineError::Io { path: path.to_path_buf(), source };
    let meta = file.metadata().map_err(io_err)?;
    if meta.is_dir() {
        return Err(EngineError::Io { path: path.to_path_buf(), source: std::io::Error::other("is a directory") });
    }
    let file_len = meta.len();
    let mut r = HeaderReader { inner: BufReader::new(file), pos: 0, len: file_len, path };

    let mut magic = [0u8; 4];
    let got = r.read_up_to(&mut magic)?;
    if got < 4 || &magic != GGUF_MAGIC {
        return Err(EngineError::NotGguf { path: path.to_path_buf(), magic: magic[..got].to_vec() });
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(EngineError::UnsupportedVersion { path: path.to_path_buf(), version });
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    // Each entry takes at least 8 bytes, so larger counts cannot be real; and no model has tens of thousands of
    // either (gpt-oss-120b has under 700 tensors). Without the caps a sparse file could claim billions, each read
    // into memory.
    if n_tensors > (file_len / 8).min(MAX_TENSORS) || n_kv > (file_len / 8).min(MAX_METADATA_ENTRIES) {
        return Err(r.corrupt(format!("implausible counts: {n_tensors} tensors, {n_kv} metadata entries")));
    }

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        // llama.cpp's own loader aborts the process on these instead of failing: refuse them here first.
        if key.is_empty() {
            return Err(r.corrupt("a metadata entry has an empty key".into()));
        }
        let value_type = r.u32()?;
        if key == "general.alignment" && value_type != GGUF_TYPE_UINT32 {
            return Err(r.corrupt(format!("general.alignment has type {value_type}; it must be a uint32")));
        }
        let value = r.value(value_type)?;
        if TOKENIZER_STRING_ARRAYS.contains(&key.as_str())
            && !matches!(value, MetaValue::Array { elem_type: GGUF_TYPE_STRING, .. })
        {
            return Err(r.corrupt(format!("{key} must be an array of strings")));
        }
        metadata.insert(key, value);
    }

    let mut tensors = Vec::with_capacity(n_tensors.min(1024) as usize);
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > MAX_DIMS {
            return Err(r.corrupt(format!("tensor {name} has {n_dims} dimensions")));
        }
        let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
        let ggml_type = r.u32()?;
        let offset = r.u64()?;
        let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let n_bytes = match (ggml_block(ggml_type), n_elements) {
            (Some((block, size)), Some(n)) => (n / block).checked_mul(size),
            _ => None,
        };
        tensors.push(TensorInfo { name, dims, ggml_type, offset, n_bytes });
    }

    let alignment = match metadata.get("general.alignment") {
        Some(MetaValue::Uint(a)) if *a > 0 && a.is_power_of_two() => *a,
        _ => DEFAULT_ALIGNMENT,
    };
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    for t in &tensors {
        let Some(bytes) = t.n_bytes else { continue };
        let end = data_offset.saturating_add(t.offset).saturating_add(bytes);
        if end > file_len {
            return Err(EngineError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor {} needs bytes up to {end} but the file has {file_len} (incomplete download or copy?)",
                    t.name
                ),
            });
        }
    }
    Ok(ModelFileInfo { path: path.to_path_buf(), version, metadata, tensors, data_offset, file_len })
}

/// `inspect`, then insist on a gpt-oss model.
pub fn inspect_gpt_oss(path: &Path) -> Result<ModelFileInfo, EngineError> {
    let info = inspect(path)?;
    if info.architecture() != Some(GPT_OSS_ARCHITECTURE) {
        return Err(EngineError::WrongArchitecture {
            path: path.to_path_buf(),
            found: info.architecture().map(str::to_string),
        });
    }
    Ok(info)
}

struct HeaderReader<'p> {
    inner: BufReader<File>,
    pos: u64,
    len: u64,
    path: &'p Path,
}

impl HeaderReader<'_> {
    fn corrupt(&self, detail: String) -> EngineError {
        EngineError::Truncated { path: self.path.to_path_buf(), detail }
    }

    fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize, EngineError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(EngineError::Io { path: self.path.to_path_buf(), source }),
            }
        }
        self.pos += filled as u64;
        Ok(filled)
    }

    fn exact<const N: usize>(&mut self) -> Result<[u8; N], EngineError> {
        let mut buf = [0u8; N];
        if self.read_up_to(&mut buf)? < N {
            return Err(self.corrupt(format!("header ends early at byte {}", self.pos)));
        }
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(self.exact()?))
    }

    fn u64(&mut self) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(self.exact()?))
    }

    fn skip(&mut self, n: u64) -> Result<(), EngineError> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(self.corrupt(format!("header ends early at byte {}", self.pos)));
        }
        let delta = i64::try_from(n).map_err(|_| self.corrupt("length overflow".into()))?;
        self.inner
            .seek(SeekFrom::Current(delta))
            .map_err(|source| EngineError::Io { path: self.path.to_path_buf(), source })?;
        self.pos += n;
        Ok(())
    }

    fn string(&mut self) -> Result<String, EngineError> {
        let n = self.u64()?;
        if n > MAX_STRING_BYTES || n > self.len.saturating_sub(self.pos) {
            return Err(self.corrupt(format!("string of {n} bytes at byte {}", self.pos)));
        }
        let mut buf = vec![0u8; n as usize];
        if self.read_up_to(&mut buf)? < buf.len() {
            return Err(self.corrupt(format!("header ends early at byte {}", self.pos)));
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn value(&mut self, value_type: u32) -> Result<MetaValue, EngineError> {
        Ok(match value_type {
            0 => MetaValue::Uint(u64::from(self.exact::<1>()?[0])),
            1 => MetaValue::Int(i64::from(i8::from_le_bytes(self.exact()?))),
            2 => MetaValue::Uint(u64::from(u16::from_le_bytes(self.exact()?))),
            3 => MetaValue::Int(i64::from(i16::from_le_bytes(self.exact()?))),
            4 => MetaValue::Uint(u64::from(self.u32()?)),
            5 => MetaValue::Int(i64::from(i32::from_le_bytes(self.exact()?))),
            6 => MetaValue::Float(f64::from(f32::from_le_bytes(self.exact()?))),
            7 => MetaValue::Bool(self.exact::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                let elem_type = self.u32()?;
                let len = self.u64()?;
                match elem_type {
                    8 => {
                        for _ in 0..len {
                            let n = self.u64()?;
                            self.skip(n)?;
                        }
                    }
                    9 => return Err(self.corrupt("nested metadata arrays are not supported".into())),
                    t => {
                        let width = scalar_width(t).ok_or_else(|| self.corrupt(format!("metadata type {t}")))?;
                        self.skip(len.checked_mul(width).ok_or_else(|| self.corrupt("array length".into()))?)?;
                    }
                }
                MetaValue::Array { elem_type, len }
            }
            10 => MetaValue::Uint(self.u64()?),
            11 => MetaValue::Int(i64::from_le_bytes(self.exact()?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.exact()?)),
            t => return Err(self.corrupt(format!("unknown metadata value type {t}"))),
        })
    }
}

fn scalar_width(t: u32) -> Option<u64> {
    Some(match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A minimal GGUF: the architecture, one u32, one string array and two f32 tensors.
    fn tiny_gguf(arch: &str) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        out.extend(3u64.to_le_bytes());
        string(&mut out, "general.architecture");
        out.extend(8u32.to_le_bytes());
        string(&mut out, arch);
        string(&mut out, &format!("{arch}.expert_count"));
        out.extend(4u32.to_le_bytes());
        out.extend(4u32.to_le_bytes());
        string(&mut out, "tokenizer.ggml.tokens");
        out.extend(9u32.to_le_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        string(&mut out, "a");
        string(&mut out, "bc");
        for (name, offset) in [("output.weight", 0u64), ("blk.0.ffn_up_exps.weight", 32)] {
            string(&mut out, name);
            out.extend(2u32.to_le_bytes());
            out.extend(4u64.to_le_bytes());
            out.extend(2u64.to_le_bytes());
            out.extend(0u32.to_le_bytes());
            out.extend(offset.to_le_bytes());
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        out.extend(vec![0u8; 64]);
        out
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn reads_metadata_and_tensor_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "m.gguf", &tiny_gguf("gpt-oss"));
        let info = inspect_gpt_oss(&path).unwrap();
        assert_eq!(info.version, 3);
        assert_eq!(info.meta_u64("gpt-oss.expert_count"), Some(4));
        assert_eq!(info.metadata["tokenizer.ggml.tokens"], MetaValue::Array { elem_type: 8, len: 2 });
        assert_eq!(info.tensors.len(), 2);
        assert_eq!(info.tensors[1].n_bytes, Some(32));
        assert_eq!(info.tensor_bytes(), 64);
        let per_token = info.bytes_read_per_token();
        assert_eq!(per_token.output_matrix, 32);
        // No expert_used_count key: every expert counts.
        assert_eq!(per_token.routed_experts, 32);
    }

    #[test]
    fn clear_errors_for_missing_foreign_truncated_and_wrong_architecture_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.gguf");
        assert!(matches!(inspect(&missing), Err(EngineError::ModelNotFound { .. })));

        let text = write(&dir, "t.gguf", b"{\"not\": \"a model\"}");
        assert!(matches!(inspect(&text), Err(EngineError::NotGguf { .. })));
        let empty = write(&dir, "e.gguf", b"");
        assert!(matches!(inspect(&empty), Err(EngineError::NotGguf { .. })));

        let full = tiny_gguf("gpt-oss");
        for cut in [10, 40, full.len() - 1] {
            let path = write(&dir, "cut.gguf", &full[..cut]);
            let err = inspect(&path).unwrap_err();
            assert!(matches!(err, EngineError::Truncated { .. }), "cut at {cut}: {err}");
        }

        let llama = write(&dir, "l.gguf", &tiny_gguf("llama"));
        let err = inspect_gpt_oss(&llama).unwrap_err();
        assert!(matches!(&err, EngineError::WrongArchitecture { found: Some(a), .. } if a == "llama"));
        assert!(err.to_string().contains("gpt-oss"));

        let mut bad_version = tiny_gguf("gpt-oss");
        bad_version[4] = 9;
        let path = write(&dir, "v.gguf", &bad_version);
        assert!(matches!(inspect(&path), Err(EngineError::UnsupportedVersion { version: 9, .. })));
    }

    #[test]
    fn absurd_lengths_are_rejected_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = tiny_gguf("gpt-oss");
        // Key length of the first metadata entry: claim 2^60 bytes.
        bytes[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let path = write(&dir, "a.gguf", &bytes);
        assert!(matches!(inspect(&path), Err(EngineError::Truncated { .. })));
        // A tensor count of 2^37 in a file that claims to be large enough for it (sparse).
        let mut bytes = tiny_gguf("gpt-oss");
        bytes[8..16].copy_from_slice(&(1u64 << 37).to_le_bytes());
        let path = write(&dir, "n.gguf", &bytes);
        File::options().write(true).open(&path).unwrap().set_len(1 << 42).unwrap();
        let err = inspect(&path).unwrap_err();
        assert!(err.to_string().contains("implausible counts"), "{err}");
    }

    /// Files llama.cpp's loader would abort the process on are refused with an error first.
    #[test]
    fn metadata_llama_cpp_asserts_on_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = tiny_gguf("gpt-oss");
        // The first key ("general.architecture", 20 bytes) emptied: its length says 0, its bytes become the type.
        let mut empty_key = good[..24].to_vec();
        empty_key.extend(0u64.to_le_bytes());
        empty_key.extend(8u32.to_le_bytes());
        string(&mut empty_key, "gpt-oss");
        let rest_at = 24 + 8 + 20 + 4 + 8 + 7;
        empty_key.extend(&good[rest_at..]);
        let path = write(&dir, "k.gguf", &empty_key);
        assert!(inspect(&path).unwrap_err().to_string().contains("empty key"));

        // The expert count's key renamed to general.alignment, still a u32: fine. As a u16 it is refused.
        let renamed = |bytes: &[u8]| {
            let from = b"gpt-oss.expert_count";
            let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
            let mut out = bytes[..at - 8].to_vec();
            string(&mut out, "general.alignment");
            out.extend(&bytes[at + from.len()..]);
            out
        };
        // Three bytes shorter: padding keeps the tensor data where the tensor table says.
        let mut aligned = renamed(&good);
        aligned.extend([0u8; 3]);
        let path = write(&dir, "a.gguf", &aligned);
        assert!(inspect(&path).is_ok());
        let key_end = aligned.windows(17).position(|w| w == b"general.alignment").unwrap() + 17;
        let mut short = aligned[..key_end].to_vec();
        short.extend(2u32.to_le_bytes());
        short.extend(4u16.to_le_bytes());
        short.extend(&aligned[key_end + 8..]);
        let path = write(&dir, "s.gguf", &short);
        assert!(inspect(&path).unwrap_err().to_string().contains("uint32"));
    }
}

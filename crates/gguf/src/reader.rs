//! GGUF v2/v3 reader over a memory map. Every length and offset read from the file is checked
//! against the file size before use, so a damaged file gives an error instead of a panic or a
//! huge allocation.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{GgufError, Result};
use crate::quant;
use crate::types::{GgmlType, TypeGeometry, ggml_type_geometry};
use crate::value::{MetaArray, MetaValue, key_error, type_id};
use crate::writer::{DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// The most elements reserved ahead of parsing. A count is only checked against the bytes left, and an element
/// in memory is several times its size on disk: reserving all of it could ask for many times the file.
const MAX_RESERVED: usize = 4096;
/// Most elements in one metadata array, and most tensors.
const MAX_COUNT: u64 = 1 << 24;

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: ne0 (contiguous) first.
    pub shape: Vec<u64>,
    pub ggml_type: u32,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The type when this crate can decode it.
    pub fn ty(&self) -> Option<GgmlType> {
        GgmlType::from_id(self.ggml_type).ok()
    }

    pub fn type_name(&self) -> String {
        ggml_type_geometry(self.ggml_type)
            .map(|g| g.name.to_string())
            .unwrap_or_else(|| format!("type{}", self.ggml_type))
    }
}

enum Backing {
    Map(Mmap),
    Bytes(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Bytes(b) => b,
        }
    }
}

pub struct GgufFile {
    backing: Backing,
    path: Option<PathBuf>,
    pub version: u32,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    metadata: Vec<(String, MetaValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.data.len() as u64,
            });
        }
        let n = n as usize;
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Malformed(format!("{} is not valid UTF-8", what())))
    }
    fn remaining(&self) -> u64 {
        (self.data.len() - self.pos) as u64
    }
    /// Refuse element counts the rest of the file cannot possibly hold, before allocating.
    fn check_count(&self, count: u64, min_elem_bytes: u64, what: &dyn Fn() -> String) -> Result<usize> {
        if count.saturating_mul(min_elem_bytes) > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: count.saturating_mul(min_elem_bytes),
                file_len: self.data.len() as u64,
            });
        }
        // The bytes on disk bound nothing in a sparse file, and each element takes more memory parsed than in the
        // file (an empty string: 8 bytes there, 24 here); no model needs more (gpt-oss's vocabulary: 201,088).
        if count > MAX_COUNT {
            return Err(GgufError::Malformed(format!("{}: {count} elements; at most {MAX_COUNT} are read", what())));
        }
        usize::try_from(count).map_err(|_| GgufError::Malformed(format!("{}: count {count} too large", what())))
    }

    fn value(&mut self, ty: u32, depth: u32, what: &dyn Fn() -> String) -> Result<MetaValue> {
        use type_id::*;
        Ok(match ty {
            U8 => MetaValue::U8(self.array::<1>(what)?[0]),
            I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            U32 => MetaValue::U32(self.u32(what)?),
            I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            BOOL => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            STRING => MetaValue::String(self.string(what)?),
            U64 => MetaValue::U64(self.u64(what)?),
            I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            ARRAY => MetaValue::Array(self.array_value(depth, what)?),
            other => return Err(GgufError::Malformed(format!("{}: unknown value type {other}", what()))),
        })
    }

    fn array_value(&mut self, depth: u32, what: &dyn Fn() -> String) -> Result<MetaArray> {
        use type_id::*;
        if depth > 8 {
            return Err(GgufError::Malformed(format!("{}: arrays nested too deeply", what())));
        }
        let elem = self.u32(what)?;
        let count = self.u64(what)?;
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let width = std::mem::size_of::<$t>() as u64;
                self.check_count(count, width, what)?;
                let raw = self.take(count * width, what)?;
                MetaArray::$variant(
                    raw.chunks_exact(width as usize)
                        .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default()))
                        .collect(),
                )
            }};
        }
        Ok(match elem {
            U8 => {
                self.check_count(count, 1, what)?;
                MetaArray::U8(self.take(count, what)?.to_vec())
            }
            I8 => fixed!(I8, i8),
            U16 => fixed!(U16, u16),
            I16 => fixed!(I16, i16),
            U32 => fixed!(U32, u32),
            I32 => fixed!(I32, i32),
            F32 => fixed!(F32, f32),
            U64 => fixed!(U64, u64),
            I64 => fixed!(I64, i64),
            F64 => fixed!(F64, f64),
            BOOL => {
                self.check_count(count, 1, what)?;
                MetaArray::Bool(self.take(count, what)?.iter().map(|&b| b != 0).collect())
            }
            STRING => {
                let n = self.check_count(count, 8, what)?;
                let mut v = Vec::with_capacity(n.min(MAX_RESERVED));
                for _ in 0..n {
                    v.push(self.string(what)?);
                }
                MetaArray::String(v)
            }
            ARRAY => {
                let n = self.check_count(count, 12, what)?;
                let mut v = Vec::with_capacity(n.min(MAX_RESERVED));
                for _ in 0..n {
                    v.push(self.array_value(depth + 1, what)?);
                }
                MetaArray::Array(v)
            }
            other => return Err(GgufError::Malformed(format!("{}: unknown array element type {other}", what()))),
        })
    }
}

impl GgufFile {
    /// Memory-map and parse a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let _span = tracing::debug_span!("gguf_open", path = %path.display()).entered();
        let file = File::open(path).map_err(|e| GgufError::io(path, e))?;
        // SAFETY: the map is read-only; a concurrent writer truncating the file could still fault,
        // which is the accepted trade-off of every mmap-based model loader (llama.cpp included).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| GgufError::io(path, e))?;
        let mut parsed = Self::parse(Backing::Map(map))?;
        parsed.path = Some(path.to_path_buf());
        Ok(parsed)
    }

    /// Parse a GGUF image held in memory (tests, small files).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Backing::Bytes(bytes))
    }

    fn parse(backing: Backing) -> Result<Self> {
        let data = backing.bytes();
        let mut c = Cursor { data, pos: 0 };
        let header = || "the header".to_string();
        if data.len() < 4 {
            return Err(GgufError::Truncated { what: header(), offset: 0, needed: 4, file_len: data.len() as u64 });
        }
        let magic: [u8; 4] = c.array(&header)?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = c.u32(&header)?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.u64(&header)?;
        let n_kv = c.u64(&header)?;
        // A key is at least 8 (length) + 4 (type) + 1 bytes; a tensor info at least 8 + 4 + 4 + 8.
        let n_kv = c.check_count(n_kv, 13, &|| "metadata".to_string())?;
        let n_tensors_usize = c.check_count(n_tensors, 24, &|| "tensor infos".to_string())?;

        let mut metadata = Vec::with_capacity(n_kv.min(MAX_RESERVED));
        let mut metadata_index = HashMap::with_capacity(n_kv.min(MAX_RESERVED));
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let ty = c.u32(&|| format!("metadata value type of {key}"))?;
            let value = c.value(ty, 0, &|| format!("metadata value of {key}"))?;
            if metadata_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::Malformed(format!("duplicate metadata key {key}")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(key_error(
                        "general.alignment",
                        format!("must be a power of two, got {}", v.display_short()),
                    ));
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors_usize.min(MAX_RESERVED));
        let mut tensor_index = HashMap::with_capacity(n_tensors_usize.min(MAX_RESERVED));
        for i in 0..n_tensors_usize {
            let name = c.string(&|| format!("tensor info #{i}"))?;
            let what = || format!("tensor info {name}");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::Tensor { name, problem: format!("{n_dims} dimensions (ggml allows 1 to 4)") });
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                shape.push(c.u64(&what)?);
            }
            let ggml_type = c.u32(&what)?;
            let offset = c.u64(&what)?;
            let geometry: TypeGeometry = ggml_type_geometry(ggml_type).ok_or_else(|| GgufError::Tensor {
                name: name.clone(),
                problem: format!("unknown ggml type {ggml_type}"),
            })?;
            let n_elems = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| GgufError::Tensor { name: name.clone(), problem: "element count overflows".into() })?;
            if shape[0] % geometry.block_elems != 0 {
                return Err(GgufError::Tensor {
                    name,
                    problem: format!(
                        "row length {} is not a multiple of the {} block size {}",
                        shape[0], geometry.name, geometry.block_elems
                    ),
                });
            }
            let n_bytes = (n_elems / geometry.block_elems)
                .checked_mul(geometry.block_bytes)
                .ok_or_else(|| GgufError::Tensor { name: name.clone(), problem: "byte size overflows".into() })?;
            if offset % alignment != 0 {
                return Err(GgufError::Tensor {
                    name,
                    problem: format!("offset {offset} is not aligned to {alignment}"),
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Malformed(format!("duplicate tensor name {name}")));
            }
            tensors.push(TensorInfo { name, shape, ggml_type, offset, n_bytes });
        }

        let pos = c.pos as u64;
        let data_offset = pos + (alignment - pos % alignment) % alignment;
        let file_len = data.len() as u64;
        for t in &tensors {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes));
            match (start, end) {
                (Some(_), Some(end)) if end <= file_len => {}
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        name: t.name.clone(),
                        start: data_offset.saturating_add(t.offset),
                        end: data_offset.saturating_add(t.offset).saturating_add(t.n_bytes),
                        file_len,
                    });
                }
            }
        }

        Ok(GgufFile {
            backing,
            path: None,
            version,
            alignment,
            data_offset,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn file_len(&self) -> u64 {
        self.backing.bytes().len() as u64
    }

    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        crate::value::u32_of(key, self.get(key))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.get(key).ok_or_else(|| key_error(key, "missing"))?;
        v.as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| key_error(key, format!("expected a number, found {}", v.display_short())))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| key_error(key, "missing"))?;
        v.as_str().ok_or_else(|| key_error(key, format!("expected a string, found {}", v.display_short())))
    }

    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// Fails with `WrongArchitecture` unless `general.architecture` equals `expected`.
    pub fn expect_architecture(&self, expected: &str) -> Result<()> {
        let found = self.architecture()?;
        if found != expected {
            return Err(GgufError::WrongArchitecture { expected: expected.to_string(), found: found.to_string() });
        }
        Ok(())
    }

    /// An architecture-scoped key, e.g. `arch_key("block_count")` -> `gpt-oss.block_count`.
    pub fn arch_key(&self, suffix: &str) -> Result<String> {
        Ok(format!("{}.{suffix}", self.architecture()?))
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's raw on-disk bytes (bounds were checked at open).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.backing.bytes()[start..start + info.n_bytes as usize]
    }

    /// Dequantize a tensor to f32 (in ggml element order).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor(name).ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let ty = info.ty().ok_or_else(|| GgufError::Tensor {
            name: name.to_string(),
            problem: format!("cannot decode type {}", info.type_name()),
        })?;
        quant::decode(self.tensor_bytes(info), ty)
    }

    /// Sum of all tensor elements.
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_elements()).fold(0u64, u64::saturating_add)
    }
}

//! Streaming GGUF v3 writer: header, metadata and tensor infos first, then tensor data in declared
//! order, so a 12 GB model never has to sit in memory. Writes to `<path>.partial` and renames on
//! `finish`, so an interrupted write never leaves something that looks like a model.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};
use crate::quant;
use crate::types::GgmlType;
use crate::value::{MetaArray, MetaValue};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const GGUF_VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A tensor to be written: `shape` is in ggml order (ne0, the contiguous dimension, first).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[u64], ty: GgmlType) -> Self {
        TensorSpec { name: name.into(), shape: shape.to_vec(), ty }
    }

    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn n_bytes(&self) -> Result<u64> {
        if let Some(&ne0) = self.shape.first()
            && ne0 % self.ty.block_elems() as u64 != 0
        {
            return Err(GgufError::Tensor {
                name: self.name.clone(),
                problem: format!("row length {ne0} is not a multiple of the {} block size", self.ty),
            });
        }
        self.ty.data_bytes(self.n_elements())
    }
}

pub struct GgufWriter {
    out: BufWriter<File>,
    partial_path: PathBuf,
    final_path: PathBuf,
    tensors: Vec<(TensorSpec, u64)>,
    alignment: u64,
    current: usize,
    written_in_current: u64,
    position: u64,
    finished: bool,
}

fn padding(position: u64, alignment: u64) -> u64 {
    (alignment - position % alignment) % alignment
}

struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Counting<W> {
    fn bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(b)?;
        self.count += b.len() as u64;
        Ok(())
    }
    fn u32(&mut self, v: u32) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }
    fn string(&mut self, s: &str) -> std::io::Result<()> {
        self.u64(s.len() as u64)?;
        self.bytes(s.as_bytes())
    }
    fn array(&mut self, a: &MetaArray) -> std::io::Result<()> {
        self.u32(a.element_type())?;
        self.u64(a.len() as u64)?;
        match a {
            MetaArray::U8(v) => self.bytes(v)?,
            MetaArray::I8(v) => v.iter().try_for_each(|x| self.bytes(&x.to_le_bytes()))?,
            MetaArray::U16(v) => v.iter().try_for_each(|x| self.bytes(&x.to_le_bytes()))?,
            MetaArray::I16(v) => v.iter().try_for_each(|x| self.bytes(&x.to_le_bytes()))?,
            MetaArray::U32(v) => v.iter().try_for_each(|x| self.bytes(&x.to_le_bytes()))?,
            MetaArray::I32(v) => v.iter().try_for_each(|x| self.bytes(&x.to_le_bytes()))?,
            MetaArray::F32(v) => v.iter().try_for_each(|x| self.bytes(&x.to_le_bytes()))?,
            MetaArray::Bool(v) => v.iter().try_for_each(|x| self.bytes(&[u8::from(*x)]))?,
            MetaArray::String(v) => v.iter().try_for_each(|x| self.string(x))?,
            MetaArray::U64(v) => v.iter().try_for_each(|x| self.bytes(&x.to_le_bytes()))?,
            MetaArray::I64(v) => v.iter().try_for_each(|x| self.bytes(&x.to_le_bytes()))?,
            MetaArray::F64(v) => v.iter().try_for_each(|x| self.bytes(&x.to_le_bytes()))?,
            MetaArray::Array(v) => v.iter().try_for_each(|x| self.array(x))?,
        }
        Ok(())
    }
    fn value(&mut self, v: &MetaValue) -> std::io::Result<()> {
        self.u32(v.type_id())?;
        match v {
            MetaValue::U8(x) => self.bytes(&[*x]),
            MetaValue::I8(x) => self.bytes(&x.to_le_bytes()),
            MetaValue::U16(x) => self.bytes(&x.to_le_bytes()),
            MetaValue::I16(x) => self.bytes(&x.to_le_bytes()),
            MetaValue::U32(x) => self.bytes(&x.to_le_bytes()),
            MetaValue::I32(x) => self.bytes(&x.to_le_bytes()),
            MetaValue::F32(x) => self.bytes(&x.to_le_bytes()),
            MetaValue::Bool(x) => self.bytes(&[u8::from(*x)]),
            MetaValue::String(x) => self.string(x),
            MetaValue::U64(x) => self.bytes(&x.to_le_bytes()),
            MetaValue::I64(x) => self.bytes(&x.to_le_bytes()),
            MetaValue::F64(x) => self.bytes(&x.to_le_bytes()),
            MetaValue::Array(a) => self.array(a),
        }
    }
}

impl GgufWriter {
    /// Write the header, metadata and tensor infos. Tensor data must follow, in the order given,
    /// through `write_tensor_*`.
    pub fn create(path: &Path, metadata: &[(String, MetaValue)], tensors: Vec<TensorSpec>) -> Result<Self> {
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Writer(format!(
                        "general.alignment must be a power of two, got {}",
                        v.display_short()
                    )));
                }
            },
            None => DEFAULT_ALIGNMENT,
        };
        let mut seen = std::collections::HashSet::new();
        for (key, _) in metadata {
            if !seen.insert(key.as_str()) {
                return Err(GgufError::Writer(format!("duplicate metadata key {key}")));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut placed = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for spec in tensors {
            if !names.insert(spec.name.clone()) {
                return Err(GgufError::Writer(format!("duplicate tensor name {}", spec.name)));
            }
            let size = spec.n_bytes()?;
            placed.push((spec, offset));
            offset += size;
            offset += padding(offset, alignment);
        }

        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial_path = PathBuf::from(partial);
        let file = File::create(&partial_path).map_err(|e| GgufError::io(&partial_path, e))?;
        let mut header = Counting { inner: BufWriter::with_capacity(1 << 20, file), count: 0 };
        let io = |e| GgufError::io(&partial_path, e);
        header.bytes(&GGUF_MAGIC).map_err(io)?;
        header.u32(GGUF_VERSION).map_err(io)?;
        header.u64(placed.len() as u64).map_err(io)?;
        header.u64(metadata.len() as u64).map_err(io)?;
        for (key, value) in metadata {
            header.string(key).map_err(io)?;
            header.value(value).map_err(io)?;
        }
        for (spec, offset) in &placed {
            header.string(&spec.name).map_err(io)?;
            header.u32(spec.shape.len() as u32).map_err(io)?;
            for &d in &spec.shape {
                header.u64(d).map_err(io)?;
            }
            header.u32(spec.ty.id()).map_err(io)?;
            header.u64(*offset).map_err(io)?;
        }
        let pad = padding(header.count, alignment);
        header.bytes(&vec![0u8; pad as usize]).map_err(io)?;
        let position = header.count;
        let mut writer = GgufWriter {
            out: header.inner,
            partial_path,
            final_path: path.to_path_buf(),
            tensors: placed,
            alignment,
            current: 0,
            written_in_current: 0,
            position,
            finished: false,
        };
        writer.skip_empty_tensors()?;
        Ok(writer)
    }

    fn skip_empty_tensors(&mut self) -> Result<()> {
        while self.current < self.tensors.len() && self.tensors[self.current].0.n_bytes()? == 0 {
            self.current += 1;
        }
        Ok(())
    }

    /// The tensor whose data is expected next.
    pub fn next_tensor(&self) -> Option<&TensorSpec> {
        self.tensors.get(self.current).map(|(s, _)| s)
    }

    /// Append raw on-disk bytes to tensor `name`, which must be the tensor currently being written.
    /// May be called several times per tensor (chunked streaming).
    pub fn write_tensor_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let (spec, _) = self
            .tensors
            .get(self.current)
            .ok_or_else(|| GgufError::Writer(format!("tensor {name}: all declared tensors are already written")))?;
        if spec.name != name {
            return Err(GgufError::Writer(format!("expected data for tensor {}, got {name}", spec.name)));
        }
        let size = spec.n_bytes()?;
        if self.written_in_current + bytes.len() as u64 > size {
            return Err(GgufError::Writer(format!(
                "tensor {name}: {} bytes written but it holds only {size}",
                self.written_in_current + bytes.len() as u64
            )));
        }
        self.out.write_all(bytes).map_err(|e| GgufError::io(&self.partial_path, e))?;
        self.written_in_current += bytes.len() as u64;
        self.position += bytes.len() as u64;
        if self.written_in_current == size {
            let pad = padding(self.position, self.alignment);
            self.out.write_all(&vec![0u8; pad as usize]).map_err(|e| GgufError::io(&self.partial_path, e))?;
            self.position += pad;
            self.current += 1;
            self.written_in_current = 0;
            self.skip_empty_tensors()?;
        }
        Ok(())
    }

    /// Encode f32 values into the tensor's declared type and append them. Chunks of quantized
    /// tensors must hold whole blocks.
    pub fn write_tensor_f32(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let ty = self
            .next_tensor()
            .filter(|s| s.name == name)
            .map(|s| s.ty)
            .ok_or_else(|| GgufError::Writer(format!("tensor {name} is not the next one to write")))?;
        let bytes = quant::encode(values, ty)?;
        self.write_tensor_bytes(name, &bytes)
    }

    /// Flush, fsync and move the file into place. Returns the file size.
    pub fn finish(mut self) -> Result<u64> {
        if let Some((spec, _)) = self.tensors.get(self.current) {
            return Err(GgufError::Writer(format!(
                "tensor {} (and {} after it) not written",
                spec.name,
                self.tensors.len() - self.current - 1
            )));
        }
        self.out.flush().map_err(|e| GgufError::io(&self.partial_path, e))?;
        self.out.get_ref().sync_all().map_err(|e| GgufError::io(&self.partial_path, e))?;
        std::fs::rename(&self.partial_path, &self.final_path).map_err(|e| GgufError::io(&self.final_path, e))?;
        self.finished = true;
        Ok(self.position)
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Abandoned write: leave nothing behind that could be mistaken for a model.
            let _ = std::fs::remove_file(&self.partial_path);
        }
    }
}

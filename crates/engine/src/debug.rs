//! Tools for checking the engine against reference implementations (HF transformers, llama-cpp-python).

use std::io::{self, Write};

#[cfg(feature = "llama")]
use crate::EngineError;

/// Float32 logits at every position of `tokens` (row i = the distribution after token i).
#[cfg(feature = "llama")]
pub fn logits(engine: &crate::llama::LlamaEngine, tokens: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
    engine.logits(tokens)
}

/// Writes a C-order little-endian float32 array in NumPy's `.npy` format (version 1.0), readable by `numpy.load`.
pub fn write_npy_f32(out: &mut impl Write, shape: &[usize], data: &[f32]) -> io::Result<()> {
    let expected: usize = shape.iter().product();
    if expected != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("shape {shape:?} holds {expected} values, got {}", data.len()),
        ));
    }
    let dims = match shape {
        [one] => format!("{one},"),
        _ => shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", "),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + header length (2) + header + '\n' must be a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let header_len =
        u16::try_from(header.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "npy header too long"))?;
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&header_len.to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    out.write_all(&bytes)
}

/// Writes rows of equal length as a 2-D `.npy` array.
pub fn write_npy_rows(out: &mut impl Write, rows: &[Vec<f32>]) -> io::Result<()> {
    let width = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|r| r.len() != width) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "rows differ in length"));
    }
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    write_npy_f32(out, &[rows.len(), width], &flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_data_follows() {
        let mut buf = Vec::new();
        write_npy_rows(&mut buf, &[vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]).unwrap();
        assert_eq!(&buf[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([buf[8], buf[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&buf[10..10 + header_len]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert!(header.ends_with('\n'));
        let data = &buf[10 + header_len..];
        assert_eq!(data.len(), 24);
        assert_eq!(f32::from_le_bytes(data[20..24].try_into().unwrap()), 6.0);
    }

    #[test]
    fn npy_rejects_shape_mismatch_and_writes_1d_tuple() {
        assert!(write_npy_f32(&mut Vec::new(), &[2, 2], &[1.0]).is_err());
        assert!(write_npy_rows(&mut Vec::new(), &[vec![1.0], vec![1.0, 2.0]]).is_err());
        let mut buf = Vec::new();
        write_npy_f32(&mut buf, &[3], &[1.0, 2.0, 3.0]).unwrap();
        assert!(String::from_utf8_lossy(&buf).contains("'shape': (3,)"));
    }
}

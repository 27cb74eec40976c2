//! Block quantizers and dequantizers for Q8_0 and MXFP4, bit-compatible with ggml's reference rows
//! (`quantize_row_q8_0_ref`, `quantize_row_mxfp4_ref`), so files we write decode identically in llama.cpp.

use half::{bf16, f16};

use crate::error::{GgufError, Result};
use crate::types::GgmlType;

pub const QK: usize = 32;
pub const Q8_0_BLOCK_BYTES: usize = 34;
pub const MXFP4_BLOCK_BYTES: usize = 17;

/// E2M1 values doubled, as ggml stores them; the E8M0 scale is halved to compensate.
pub const MXFP4_KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half of 2^(e-127), the scale that pairs with the doubled `MXFP4_KVALUES` (ggml_e8m0_to_fp32_half).
pub fn e8m0_to_f32_half(e: u8) -> f32 {
    let bits: u32 = if e < 2 { 0x0020_0000u32 << e } else { u32::from(e - 1) << 23 };
    f32::from_bits(bits)
}

/// floor(log2(x)) for finite x > 0, computed from the bits so it cannot differ between libms.
fn floor_log2(x: f32) -> i32 {
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32;
    if exp == 0 {
        // subnormal: value = mantissa * 2^-149
        let mantissa = bits & 0x7f_ffff;
        31 - mantissa.leading_zeros() as i32 - 149
    } else {
        exp - 127
    }
}

fn check_blocks(n: usize, what: &str) -> Result<()> {
    if !n.is_multiple_of(QK) {
        return Err(GgufError::Malformed(format!("{what}: {n} values are not a multiple of the block size {QK}")));
    }
    Ok(())
}

/// f32 -> Q8_0: per 32 values one f16 scale amax/127 and 32 signed bytes round(x/scale).
pub fn quantize_q8_0(values: &[f32]) -> Result<Vec<u8>> {
    check_blocks(values.len(), "Q8_0")?;
    let mut out = Vec::with_capacity(values.len() / QK * Q8_0_BLOCK_BYTES);
    for block in values.chunks_exact(QK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        // f32::round rounds half away from zero, like C roundf.
        out.extend(block.iter().map(|v| ((v * id).round() as i8) as u8));
    }
    Ok(out)
}

pub fn dequantize_q8_0(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(Q8_0_BLOCK_BYTES) {
        return Err(GgufError::Malformed(format!("Q8_0 data of {} bytes is not whole blocks", bytes.len())));
    }
    let mut out = Vec::with_capacity(bytes.len() / Q8_0_BLOCK_BYTES * QK);
    for block in bytes.chunks_exact(Q8_0_BLOCK_BYTES) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
    }
    Ok(out)
}

fn best_mxfp4_index(x: f32, d: f32) -> u8 {
    let mut best = 0u8;
    let mut best_err = (f32::from(MXFP4_KVALUES[0]) * d - x).abs();
    for (i, &k) in MXFP4_KVALUES.iter().enumerate().skip(1) {
        let err = (f32::from(k) * d - x).abs();
        if err < best_err {
            best = i as u8;
            best_err = err;
        }
    }
    best
}

/// f32 -> MXFP4: per 32 values one E8M0 exponent byte, then 16 bytes whose low nibbles hold
/// elements 0..16 and high nibbles elements 16..32.
pub fn quantize_mxfp4(values: &[f32]) -> Result<Vec<u8>> {
    check_blocks(values.len(), "MXFP4")?;
    let mut out = Vec::with_capacity(values.len() / QK * MXFP4_BLOCK_BYTES);
    for block in values.chunks_exact(QK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let e: u8 = if amax > 0.0 && amax.is_finite() { (floor_log2(amax) - 2 + 127).clamp(0, 255) as u8 } else { 0 };
        let d = e8m0_to_f32_half(e);
        out.push(e);
        for j in 0..QK / 2 {
            let lo = best_mxfp4_index(block[j], d);
            let hi = best_mxfp4_index(block[j + QK / 2], d);
            out.push(lo | (hi << 4));
        }
    }
    Ok(out)
}

pub fn dequantize_mxfp4(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(MXFP4_BLOCK_BYTES) {
        return Err(GgufError::Malformed(format!("MXFP4 data of {} bytes is not whole blocks", bytes.len())));
    }
    let mut out = vec![0.0f32; bytes.len() / MXFP4_BLOCK_BYTES * QK];
    for (block, dst) in bytes.chunks_exact(MXFP4_BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = e8m0_to_f32_half(block[0]);
        for (j, &q) in block[1..].iter().enumerate() {
            dst[j] = f32::from(MXFP4_KVALUES[usize::from(q & 0x0f)]) * d;
            dst[j + QK / 2] = f32::from(MXFP4_KVALUES[usize::from(q >> 4)]) * d;
        }
    }
    Ok(out)
}

/// Encode f32 values as `ty`'s on-disk bytes.
pub fn encode(values: &[f32], ty: GgmlType) -> Result<Vec<u8>> {
    Ok(match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => quantize_q8_0(values)?,
        GgmlType::Mxfp4 => quantize_mxfp4(values)?,
    })
}

/// Decode `ty`'s on-disk bytes to f32.
pub fn decode(bytes: &[u8], ty: GgmlType) -> Result<Vec<f32>> {
    let whole = |width: usize| {
        if !bytes.len().is_multiple_of(width) {
            Err(GgufError::Malformed(format!("{ty} data of {} bytes is not whole elements", bytes.len())))
        } else {
            Ok(())
        }
    };
    Ok(match ty {
        GgmlType::F32 => {
            whole(4)?;
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        GgmlType::F16 => {
            whole(2)?;
            bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        GgmlType::BF16 => {
            whole(2)?;
            bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        GgmlType::Q8_0 => dequantize_q8_0(bytes)?,
        GgmlType::Mxfp4 => dequantize_mxfp4(bytes)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_half_scales() {
        assert_eq!(e8m0_to_f32_half(127), 0.5);
        assert_eq!(e8m0_to_f32_half(128), 1.0);
        assert_eq!(e8m0_to_f32_half(130), 4.0);
        assert_eq!(e8m0_to_f32_half(0), 2f32.powi(-128));
        assert_eq!(e8m0_to_f32_half(1), 2f32.powi(-127));
    }

    #[test]
    fn floor_log2_matches_definition() {
        for x in [1.0f32, 1.5, 2.0, 3.99, 4.0, 0.3, 1e-3, 6.0e-39, 1.0e-45, 3.0e38] {
            let expected = (x as f64).log2().floor() as i32;
            assert_eq!(floor_log2(x), expected, "x = {x}");
        }
    }

    #[test]
    fn q8_0_block_by_hand() {
        // amax 127 -> d = 1.0 exactly; values round half away from zero.
        let mut v = vec![0.0f32; 32];
        v[0] = 127.0;
        v[1] = -2.5;
        v[2] = 2.49;
        v[3] = -127.0;
        let q = quantize_q8_0(&v).unwrap();
        assert_eq!(q.len(), 34);
        assert_eq!(&q[0..2], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(q[2] as i8, 127);
        assert_eq!(q[3] as i8, -3);
        assert_eq!(q[4] as i8, 2);
        assert_eq!(q[5] as i8, -127);
        let back = dequantize_q8_0(&q).unwrap();
        assert_eq!(&back[..4], &[127.0, -3.0, 2.0, -127.0]);
    }

    #[test]
    fn q8_0_zero_block_stays_zero() {
        let q = quantize_q8_0(&[0.0; 32]).unwrap();
        assert!(q.iter().all(|&b| b == 0));
        assert_eq!(dequantize_q8_0(&q).unwrap(), vec![0.0; 32]);
    }

    #[test]
    fn mxfp4_block_by_hand() {
        // amax 6 -> floor(log2 6) = 2 -> e = 127, d = 0.5; kvalue index for 6.0 is 7 (12 * 0.5).
        let mut v = vec![0.0f32; 32];
        v[0] = 6.0;
        v[1] = -1.0; // -2 * 0.5 -> index 10
        v[16] = 0.5; // 1 * 0.5 -> index 1, high nibble of byte 0
        v[31] = -3.0; // -6 * 0.5 -> index 13, high nibble of byte 15
        v[2] = 0.74; // nearest of {0.5, 1.0} is 0.5 -> index 1
        let q = quantize_mxfp4(&v).unwrap();
        assert_eq!(q.len(), 17);
        assert_eq!(q[0], 127);
        assert_eq!(q[1], 7 | (1 << 4));
        assert_eq!(q[2], 10);
        assert_eq!(q[3], 1);
        assert_eq!(q[16], 13 << 4);
        let back = dequantize_mxfp4(&q).unwrap();
        assert_eq!(back[0], 6.0);
        assert_eq!(back[1], -1.0);
        assert_eq!(back[2], 0.5);
        assert_eq!(back[16], 0.5);
        assert_eq!(back[31], -3.0);
    }

    #[test]
    fn mxfp4_representable_values_round_trip_exactly() {
        // amax 12 * 2^-3 = 1.5 -> floor(log2) = 0 -> e = 125 -> d = 2^-3, so every kvalue * 2^-3 is exact.
        let v: Vec<f32> = (0..32).map(|i| f32::from(MXFP4_KVALUES[i % 16]) * 0.125).collect();
        let back = dequantize_mxfp4(&quantize_mxfp4(&v).unwrap()).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn round_trip_errors_are_bounded() {
        let v: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let q8 = dequantize_q8_0(&quantize_q8_0(&v).unwrap()).unwrap();
        for (a, b) in v.iter().zip(&q8) {
            // half a quantization step, plus the f16 rounding of the scale (2^-11 relative)
            let amax = 50.0 / 17.0;
            assert!((a - b).abs() <= amax / 127.0 * 0.5 + amax / 2048.0, "{a} vs {b}");
        }
        let fp4 = dequantize_mxfp4(&quantize_mxfp4(&v).unwrap()).unwrap();
        for (a, b) in v.iter().zip(&fp4) {
            // Largest E2M1 gap is 2 (of 6) doubled units; half of it relative to the block max.
            assert!((a - b).abs() <= 0.5, "{a} vs {b}");
        }
    }

    #[test]
    fn float_types_round_trip() {
        let v = [1.0f32, -2.5, 0.1, 65504.0];
        assert_eq!(decode(&encode(&v, GgmlType::F32).unwrap(), GgmlType::F32).unwrap(), v);
        let h = decode(&encode(&v, GgmlType::F16).unwrap(), GgmlType::F16).unwrap();
        assert_eq!(h[0], 1.0);
        assert_eq!(h[3], 65504.0);
        assert!((h[2] - 0.1).abs() < 1e-4);
        let b = decode(&encode(&v, GgmlType::BF16).unwrap(), GgmlType::BF16).unwrap();
        assert_eq!(b[1], -2.5);
    }

    #[test]
    fn partial_blocks_are_rejected() {
        assert!(quantize_q8_0(&[1.0; 31]).is_err());
        assert!(quantize_mxfp4(&[1.0; 33]).is_err());
        assert!(dequantize_mxfp4(&[0; 16]).is_err());
    }
}

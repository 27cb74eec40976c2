//! ggml tensor types this crate can store, with their block geometry.

use crate::error::{GgufError, Result};

/// The subset of ggml tensor types gpt-oss files use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q8_0,
    BF16,
    Mxfp4,
}

impl GgmlType {
    pub const fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
            GgmlType::Mxfp4 => 39,
        }
    }

    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            39 => GgmlType::Mxfp4,
            other => return Err(GgufError::UnsupportedType(other)),
        })
    }

    /// Elements per block (1 for plain float types).
    pub const fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Mxfp4 => 32,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Mxfp4 => 1 + 16,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::BF16 => "BF16",
            GgmlType::Mxfp4 => "MXFP4",
        }
    }

    /// Bytes needed for `n_elems` elements; errors when blocks do not divide the count.
    pub fn data_bytes(self, n_elems: u64) -> Result<u64> {
        let block = self.block_elems() as u64;
        if !n_elems.is_multiple_of(block) {
            return Err(GgufError::Malformed(format!(
                "{} elements do not fill whole {} blocks of {block}",
                n_elems,
                self.name()
            )));
        }
        Ok(n_elems / block * self.block_bytes() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for GgmlType {
    type Err = GgufError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => GgmlType::F32,
            "f16" => GgmlType::F16,
            "q8_0" => GgmlType::Q8_0,
            "bf16" => GgmlType::BF16,
            "mxfp4" => GgmlType::Mxfp4,
            other => return Err(GgufError::Malformed(format!("unknown tensor type {other:?}"))),
        })
    }
}

/// Block geometry of any ggml type id llama.cpp knows, so files holding types we cannot decode
/// (Q4_K community quants, …) can still be inspected and bounds-checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeGeometry {
    pub block_elems: u64,
    pub block_bytes: u64,
    pub name: &'static str,
}

pub fn ggml_type_geometry(id: u32) -> Option<TypeGeometry> {
    let (block_elems, block_bytes, name) = match id {
        0 => (1, 4, "F32"),
        1 => (1, 2, "F16"),
        2 => (32, 18, "Q4_0"),
        3 => (32, 20, "Q4_1"),
        6 => (32, 22, "Q5_0"),
        7 => (32, 24, "Q5_1"),
        8 => (32, 34, "Q8_0"),
        9 => (32, 40, "Q8_1"),
        10 => (256, 84, "Q2_K"),
        11 => (256, 110, "Q3_K"),
        12 => (256, 144, "Q4_K"),
        13 => (256, 176, "Q5_K"),
        14 => (256, 210, "Q6_K"),
        15 => (256, 292, "Q8_K"),
        16 => (256, 66, "IQ2_XXS"),
        17 => (256, 74, "IQ2_XS"),
        18 => (256, 98, "IQ3_XXS"),
        19 => (256, 50, "IQ1_S"),
        20 => (32, 18, "IQ4_NL"),
        21 => (256, 110, "IQ3_S"),
        22 => (256, 82, "IQ2_S"),
        23 => (256, 136, "IQ4_XS"),
        24 => (1, 1, "I8"),
        25 => (1, 2, "I16"),
        26 => (1, 4, "I32"),
        27 => (1, 8, "I64"),
        28 => (1, 8, "F64"),
        29 => (256, 56, "IQ1_M"),
        30 => (1, 2, "BF16"),
        34 => (256, 54, "TQ1_0"),
        35 => (256, 66, "TQ2_0"),
        39 => (32, 17, "MXFP4"),
        40 => (64, 36, "NVFP4"),
        41 => (128, 18, "Q1_0"),
        _ => return None,
    };
    Some(TypeGeometry { block_elems, block_bytes, name })
}

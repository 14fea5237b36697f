//! Floating-point element types of model files and conversions through f32.

use crate::error::{MergeError, Result};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// The element type of a tensor in a model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// The safetensors header name.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
        }
    }

    /// The `torch_dtype` / `dtype` name in `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    /// Parses `float32` / `f32` / `fp16` / `bf16`… (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Some(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Some(Self::F16),
            "bf16" | "bfloat16" => Some(Self::BF16),
            _ => None,
        }
    }

    /// From a safetensors dtype; other types are not model weights we can merge.
    pub fn from_safetensors(
        d: safetensors::Dtype,
        tensor: &str,
        file: &std::path::Path,
    ) -> Result<Self> {
        match d {
            safetensors::Dtype::F32 => Ok(Self::F32),
            safetensors::Dtype::F16 => Ok(Self::F16),
            safetensors::Dtype::BF16 => Ok(Self::BF16),
            other => Err(MergeError::bad_file(
                file,
                format!("tensor `{tensor}` has dtype {other:?}; only F32, F16 and BF16 weights are supported"),
            )
            .with_hint("dequantise the model (for example a GPTQ/AWQ/bitsandbytes checkpoint) to a float dtype first")),
        }
    }
}

/// Decodes little-endian elements of `dtype` into f32.
pub fn to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// Encodes f32 values as little-endian `dtype` (round to nearest even, as torch does).
pub fn from_f32(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes())),
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rounds_to_nearest_even() {
        let v = [1.0f32, -2.5, 0.1, 65504.0, 1e-8];
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let back = to_f32(&from_f32(&v, dt), dt);
            for (a, b) in v.iter().zip(&back) {
                let tol = match dt {
                    DType::F32 => 0.0,
                    DType::F16 => a.abs() * 1e-3 + 1e-7,
                    DType::BF16 => a.abs() * 8e-3 + 1e-30,
                };
                assert!((a - b).abs() <= tol, "{dt:?} {a} {b}");
            }
        }
        // 1 + 2^-8 is a tie between two bf16 values: even mantissa wins.
        let tie = 1.0f32 + 1.0 / 256.0;
        assert_eq!(to_f32(&from_f32(&[tie], DType::BF16), DType::BF16)[0], 1.0);
        assert_eq!(DType::parse("BFloat16"), Some(DType::BF16));
        assert_eq!(DType::parse("int8"), None);
    }
}

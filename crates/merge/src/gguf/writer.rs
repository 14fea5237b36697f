//! The GGUF v3 container: header, typed metadata, tensor infos and aligned data,
//! streamed tensor by tensor (ggml `docs/gguf.md`, `src/gguf.cpp`).
//!
//! llama.cpp is type-strict on metadata and checks that every tensor's offset is
//! the running sum of its padded sizes in tensor-info order; both are enforced here.

use crate::error::{MergeError, Result};
use std::io::Write;

/// The default (and our) data alignment.
pub const ALIGNMENT: u64 = 32;

/// A ggml tensor type this writer emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[allow(non_camel_case_types)] // ggml's own names
pub enum GgmlType {
    /// f32.
    F32,
    /// f16.
    F16,
    /// 5-bit blocks of 32 (Q4_K's fallback for rows not divisible by 256).
    Q5_0,
    /// 8-bit blocks of 32.
    Q8_0,
    /// 4-bit k-quant super-blocks of 256.
    Q4_K,
    /// 6-bit k-quant super-blocks of 256.
    Q6_K,
    /// bfloat16.
    BF16,
}

impl GgmlType {
    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q5_0 => 6,
            Self::Q8_0 => 8,
            Self::Q4_K => 12,
            Self::Q6_K => 14,
            Self::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q5_0 | Self::Q8_0 => 32,
            Self::Q4_K | Self::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4_K => 144,
            Self::Q6_K => 210,
        }
    }

    /// Bytes of a tensor of `numel` elements (whose rows are multiples of the block size).
    pub fn nbytes(self, numel: usize) -> usize {
        numel / self.block_size() * self.block_bytes()
    }

    /// The name ggml prints.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q5_0 => "Q5_0",
            Self::Q8_0 => "Q8_0",
            Self::Q4_K => "Q4_K",
            Self::Q6_K => "Q6_K",
            Self::BF16 => "BF16",
        }
    }
}

/// A typed metadata value (GGUF value types 0..12).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// u8 (type 0).
    U8(u8),
    /// u32 (type 4).
    U32(u32),
    /// i32 (type 5).
    I32(i32),
    /// f32 (type 6).
    F32(f32),
    /// bool (type 7).
    Bool(bool),
    /// string (type 8).
    Str(String),
    /// u64 (type 10).
    U64(u64),
    /// array of u32.
    ArrU32(Vec<u32>),
    /// array of i32.
    ArrI32(Vec<i32>),
    /// array of f32.
    ArrF32(Vec<f32>),
    /// array of strings.
    ArrStr(Vec<String>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Value {
    fn encode(&self, out: &mut Vec<u8>) {
        let ty = |out: &mut Vec<u8>, t: u32| out.extend_from_slice(&t.to_le_bytes());
        let arr = |out: &mut Vec<u8>, t: u32, n: usize| {
            out.extend_from_slice(&9u32.to_le_bytes());
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(n as u64).to_le_bytes());
        };
        match self {
            Self::U8(v) => {
                ty(out, 0);
                out.push(*v);
            }
            Self::U32(v) => {
                ty(out, 4);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Self::I32(v) => {
                ty(out, 5);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Self::F32(v) => {
                ty(out, 6);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Self::Bool(v) => {
                ty(out, 7);
                out.push(u8::from(*v));
            }
            Self::Str(s) => {
                ty(out, 8);
                put_str(out, s);
            }
            Self::U64(v) => {
                ty(out, 10);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Self::ArrU32(v) => {
                arr(out, 4, v.len());
                v.iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
            Self::ArrI32(v) => {
                arr(out, 5, v.len());
                v.iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
            Self::ArrF32(v) => {
                arr(out, 6, v.len());
                v.iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
            Self::ArrStr(v) => {
                arr(out, 8, v.len());
                v.iter().for_each(|s| put_str(out, s));
            }
        }
    }
}

/// One tensor's entry: name, ggml dims (innermost first, i.e. a PyTorch shape reversed) and type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// GGUF tensor name (< 64 bytes).
    pub name: String,
    /// ggml `ne` (innermost first).
    pub ne: Vec<u64>,
    /// Stored type.
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.ne.iter().product::<u64>() as usize
    }

    /// Bytes of the data.
    pub fn nbytes(&self) -> usize {
        self.ty.nbytes(self.numel())
    }
}

fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// Checks names, dims and block divisibility, and rejects duplicates.
pub fn validate(kvs: &[(String, Value)], tensors: &[TensorInfo]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (k, _) in kvs {
        if !seen.insert(k.as_str()) {
            return Err(MergeError::Check(format!(
                "GGUF: duplicate metadata key `{k}`"
            )));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        if t.name.len() >= 64 {
            return Err(MergeError::Check(format!(
                "GGUF: tensor name `{}` is 64 bytes or longer",
                t.name
            )));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(MergeError::Check(format!(
                "GGUF: duplicate tensor `{}`",
                t.name
            )));
        }
        if t.ne.is_empty()
            || t.ne.len() > 4
            || !(t.ne[0] as usize).is_multiple_of(t.ty.block_size())
        {
            return Err(MergeError::Check(format!(
                "GGUF: tensor `{}` dims {:?} do not fit type {}",
                t.name,
                t.ne,
                t.ty.name()
            )));
        }
    }
    Ok(())
}

/// The header, metadata and tensor infos (everything before the data), padded to the alignment.
pub fn header(kvs: &[(String, Value)], tensors: &[TensorInfo]) -> Result<Vec<u8>> {
    validate(kvs, tensors)?;
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        v.encode(&mut out);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ty.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += pad(t.nbytes() as u64);
    }
    out.resize(pad(out.len() as u64) as usize, 0);
    Ok(out)
}

/// Writes a whole GGUF file: `produce(i)` returns tensor `i`'s encoded bytes, in order.
/// `path` names the file in I/O errors (a full disk).
pub fn write(
    path: &std::path::Path,
    w: &mut dyn Write,
    kvs: &[(String, Value)],
    tensors: &[TensorInfo],
    produce: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let io = |e| MergeError::io(path, e);
    w.write_all(&header(kvs, tensors)?).map_err(io)?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = produce(i)?;
        if bytes.len() != t.nbytes() {
            return Err(MergeError::Check(format!(
                "internal: GGUF tensor `{}` encoded to {} bytes, expected {}",
                t.name,
                bytes.len(),
                t.nbytes()
            )));
        }
        w.write_all(&bytes).map_err(io)?;
        let padding = pad(bytes.len() as u64) as usize - bytes.len();
        w.write_all(&vec![0u8; padding]).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_and_offsets() {
        let kvs = vec![(
            "general.architecture".to_string(),
            Value::Str("llama".into()),
        )];
        let t = vec![
            TensorInfo {
                name: "a".into(),
                ne: vec![3],
                ty: GgmlType::F32,
            },
            TensorInfo {
                name: "b".into(),
                ne: vec![32, 2],
                ty: GgmlType::Q8_0,
            },
        ];
        let h = header(&kvs, &t).unwrap();
        assert_eq!(&h[..4], b"GGUF");
        assert_eq!(h.len() % 32, 0);
        let mut out = Vec::new();
        write(
            std::path::Path::new("test.gguf"),
            &mut out,
            &kvs,
            &t,
            &mut |i| Ok(vec![0u8; t[i].nbytes()]),
        )
        .unwrap();
        assert_eq!(out.len(), h.len() + 32 + 96);
        let dup = vec![t[0].clone(), t[0].clone()];
        assert!(header(&kvs, &dup).is_err());
        let bad = vec![TensorInfo {
            name: "c".into(),
            ne: vec![33],
            ty: GgmlType::Q8_0,
        }];
        assert!(header(&kvs, &bad).is_err());
    }
}

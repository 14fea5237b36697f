//! GGUF (v2/v3) reader: header, metadata, tensor directory, and tensor data
//! dequantised to f32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).
//!
//! Dequantisation runs as libtorch tensor ops over whole block arrays, with
//! ggml's block layouts and arithmetic order (`ggml-common.h`,
//! `dequantize_row_*` in `ggml-quants.c`), so results equal gguf-py's
//! `gguf.quants.dequantize` bit for bit.

use crate::error::{EngineError, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// uint8
    U8(u8),
    /// int8
    I8(i8),
    /// uint16
    U16(u16),
    /// int16
    I16(i16),
    /// uint32
    U32(u32),
    /// int32
    I32(i32),
    /// float32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string
    String(String),
    /// array of values
    Array(Vec<GgufValue>),
    /// uint64
    U64(u64),
    /// int64
    I64(i64),
    /// float64
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, when it is an integer ≥ 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The ggml tensor types this reader dequantises (others are named in errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 32-element blocks: f16 scale, 32 × i8.
    Q8_0,
    /// 32-element blocks: f16 scale, 16 bytes of 4-bit values (offset 8).
    Q4_0,
    /// 32-element blocks: f16 scale, f16 min, 16 bytes of 4-bit values.
    Q4_1,
    /// 32-element blocks: f16 scale, 32 high bits, 16 bytes of low nibbles (offset 16).
    Q5_0,
    /// 32-element blocks: f16 scale, f16 min, 32 high bits, 16 bytes of low nibbles.
    Q5_1,
    /// 256-element super-blocks with 6-bit sub-block scales and mins.
    Q4K,
    /// 256-element super-blocks of 6-bit values with i8 sub-block scales.
    Q6K,
    /// A type this reader does not dequantise (the ggml type id).
    Other(u32),
}

impl GgmlType {
    /// From the ggml type id.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    /// ggml's name of the type.
    pub fn name(self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::BF16 => "BF16".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Q5_0 => "Q5_0".into(),
            Self::Q5_1 => "Q5_1".into(),
            Self::Q4K => "Q4_K".into(),
            Self::Q6K => "Q6_K".into(),
            Self::Other(id) => format!("ggml type {id}"),
        }
    }

    /// (elements per block, bytes per block), for supported types.
    pub fn block(self) -> Option<(u64, u64)> {
        match self {
            Self::F32 => Some((1, 4)),
            Self::F16 | Self::BF16 => Some((1, 2)),
            Self::Q8_0 => Some((32, 34)),
            Self::Q4_0 => Some((32, 18)),
            Self::Q4_1 => Some((32, 20)),
            Self::Q5_0 => Some((32, 22)),
            Self::Q5_1 => Some((32, 24)),
            Self::Q4K => Some((256, 144)),
            Self::Q6K => Some((256, 210)),
            Self::Other(_) => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// Tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml dims, innermost first (`ne`); the PyTorch shape is the reverse.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The PyTorch shape (dims reversed).
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
}

/// An opened GGUF file: metadata and tensor directory in memory, data read on demand.
#[derive(Debug)]
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key → value, in file order of keys sorted.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor directory, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    data_start: u64,
    file_len: u64,
}

struct Cursor<'a> {
    r: BufReader<File>,
    path: &'a Path,
    pos: u64,
}

impl Cursor<'_> {
    fn bytes(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.r.read_exact(&mut buf).map_err(|e| {
            EngineError::format(
                self.path,
                format!("truncated at byte {} reading {what}: {e}", self.pos),
            )
        })?;
        self.pos += n as u64;
        Ok(buf)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let v = self.bytes(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&v);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str, limit: u64) -> Result<String> {
        let at = self.pos;
        let n = self.u64(what)?;
        if n > limit {
            return Err(EngineError::format(
                self.path,
                format!("{what} at byte {at} claims {n} bytes (corrupt file?)"),
            ));
        }
        String::from_utf8(self.bytes(n as usize, what)?).map_err(|_| {
            EngineError::format(self.path, format!("{what} at byte {at} is not UTF-8"))
        })
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32, limit: u64) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>(key)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.arr(key)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => GgufValue::Bool(self.arr::<1>(key)?[0] != 0),
            8 => GgufValue::String(self.string(key, limit)?),
            9 if depth == 0 => {
                let inner = self.u32(key)?;
                let at = self.pos;
                let n = self.u64(key)?;
                if n > limit {
                    return Err(EngineError::format(
                        self.path,
                        format!("array `{key}` at byte {at} claims {n} items (corrupt file?)"),
                    ));
                }
                let mut items = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    items.push(self.value(inner, key, depth + 1, limit)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr(key)?)),
            other => {
                return Err(EngineError::format(
                    self.path,
                    format!(
                        "metadata `{key}` has unknown value type {other} (byte {})",
                        self.pos
                    ),
                ));
            }
        })
    }
}

impl GgufFile {
    /// Reads the header, metadata and tensor directory.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        let mut c = Cursor {
            r: BufReader::with_capacity(1 << 20, file),
            path,
            pos: 0,
        };
        let magic = c.arr::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(EngineError::format(
                path,
                "not a GGUF file (the first bytes are not `GGUF`)",
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(EngineError::unsupported(
                format!("GGUF version {version} in {}", path.display()),
                Some("re-convert the model with a current llama.cpp (GGUF v3)"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > file_len || n_kv > file_len {
            return Err(EngineError::format(path, "corrupt header counts"));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key", 1 << 16)?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0, file_len)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name", 1 << 16)?;
            let n_dims = c.u32(&name)?;
            if n_dims > 4 {
                return Err(EngineError::format(
                    path,
                    format!("tensor `{name}` has {n_dims} dims (at most 4)"),
                ));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&name))
                .collect::<Result<Vec<_>>>()?;
            let ggml_type = GgmlType::from_id(c.u32(&name)?);
            let offset = c.u64(&name)?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32)
            .max(1);
        let data_start = c.pos.div_ceil(alignment) * alignment;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            file_len,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The tensor directory entry of `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads a tensor's raw bytes.
    pub fn raw(&self, info: &GgufTensorInfo) -> Result<Vec<u8>> {
        let Some((per_block, block_bytes)) = info.ggml_type.block() else {
            return Err(EngineError::unsupported(
                format!(
                    "tensor `{}` in {} is stored as {}",
                    info.name,
                    self.path.display(),
                    info.ggml_type.name()
                ),
                Some("supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K"),
            ));
        };
        let numel = info.numel();
        if !numel.is_multiple_of(per_block) {
            return Err(EngineError::format(
                &self.path,
                format!(
                    "tensor `{}`: {numel} elements is not a multiple of the {}-element {} block",
                    info.name,
                    per_block,
                    info.ggml_type.name()
                ),
            ));
        }
        let n = numel / per_block * block_bytes;
        let start = self.data_start + info.offset;
        if start.checked_add(n).is_none_or(|end| end > self.file_len) {
            return Err(EngineError::format(
                &self.path,
                format!(
                    "tensor `{}` ({} bytes at {start}) runs past the end of the file ({} bytes): truncated download?",
                    info.name, n, self.file_len
                ),
            ));
        }
        let mut f = File::open(&self.path).map_err(|e| EngineError::io(&self.path, e))?;
        f.seek(SeekFrom::Start(start))
            .map_err(|e| EngineError::io(&self.path, e))?;
        let mut buf = vec![0u8; n as usize];
        f.read_exact(&mut buf)
            .map_err(|e| EngineError::io(&self.path, e))?;
        Ok(buf)
    }

    /// Reads a tensor dequantised to f32, in PyTorch shape (dims reversed).
    pub fn read_f32(&self, info: &GgufTensorInfo) -> Result<Tensor> {
        let raw = self.raw(info)?;
        let flat = dequantize(&raw, info.ggml_type, info.numel() as i64)?;
        Ok(flat.reshape(info.shape()))
    }
}

fn bytes(raw: &[u8]) -> Tensor {
    Tensor::from_slice(raw)
}

/// Columns `[from, from + n)` of a `[blocks, width]` byte tensor, as ints.
fn cols(blocks: &Tensor, from: i64, n: i64) -> Tensor {
    blocks.narrow(1, from, n).to_kind(Kind::Int)
}

/// An f16 field at byte `from` of each block, as f32 `[blocks, 1]`.
fn f16_field(blocks: &Tensor, from: i64) -> Tensor {
    blocks
        .narrow(1, from, 2)
        .contiguous()
        .view_dtype(Kind::Half)
        .to_kind(Kind::Float)
}

/// Dequantises `numel` elements stored as `ty` into a flat f32 tensor.
pub fn dequantize(raw: &[u8], ty: GgmlType, numel: i64) -> Result<Tensor> {
    let t = bytes(raw);
    let out = match ty {
        GgmlType::F32 => t.view_dtype(Kind::Float),
        GgmlType::F16 => t.view_dtype(Kind::Half).to_kind(Kind::Float),
        GgmlType::BF16 => t.view_dtype(Kind::BFloat16).to_kind(Kind::Float),
        GgmlType::Q8_0 => {
            let b = t.view([-1, 34]);
            let d = f16_field(&b, 0);
            let q = b
                .narrow(1, 2, 32)
                .contiguous()
                .view_dtype(Kind::Int8)
                .to_kind(Kind::Float);
            (d * q).view([-1])
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let width = if ty == GgmlType::Q4_0 { 18 } else { 20 };
            let b = t.view([-1, width]);
            let d = f16_field(&b, 0);
            let qs = cols(&b, width - 16, 16);
            let q = Tensor::cat(
                &[qs.bitwise_and(0xF), qs.bitwise_right_shift_tensor_scalar(4)],
                1,
            )
            .to_kind(Kind::Float);
            if ty == GgmlType::Q4_0 {
                ((q - 8.0) * d).view([-1])
            } else {
                let m = f16_field(&b, 2);
                (d * q + m).view([-1])
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // llama.cpp's Q5 (the Q4_K_M fallback for rows that are not a
            // multiple of 256): element i's fifth bit is bit i of `qh`.
            let (width, hq) = if ty == GgmlType::Q5_0 {
                (22, 2)
            } else {
                (24, 4)
            };
            let b = t.view([-1, width]);
            let d = f16_field(&b, 0);
            let h = b.narrow(1, hq, 4).to_kind(Kind::Int64);
            let qh = h.narrow(1, 0, 1)
                + h.narrow(1, 1, 1).bitwise_left_shift_tensor_scalar(8)
                + h.narrow(1, 2, 1).bitwise_left_shift_tensor_scalar(16)
                + h.narrow(1, 3, 1).bitwise_left_shift_tensor_scalar(24);
            let bits = Tensor::arange(32, (Kind::Int64, Device::Cpu)).view([1, 32]);
            let high = qh
                .bitwise_right_shift(&bits)
                .bitwise_and(1)
                .bitwise_left_shift_tensor_scalar(4);
            let qs = cols(&b, hq + 4, 16).to_kind(Kind::Int64);
            let low = Tensor::cat(
                &[qs.bitwise_and(0xF), qs.bitwise_right_shift_tensor_scalar(4)],
                1,
            );
            let q = low.bitwise_or_tensor(&high).to_kind(Kind::Float);
            if ty == GgmlType::Q5_0 {
                ((q - 16.0) * d).view([-1])
            } else {
                let m = f16_field(&b, 2);
                (d * q + m).view([-1])
            }
        }
        GgmlType::Q4K => {
            let b = t.view([-1, 144]);
            let nb = b.size()[0];
            let d = f16_field(&b, 0);
            let dmin = f16_field(&b, 2);
            let s = cols(&b, 4, 12);
            let lo = s.narrow(1, 0, 4);
            let mid = s.narrow(1, 4, 4);
            let hi = s.narrow(1, 8, 4);
            // get_scale_min_k4: sub-blocks 0..4 use 6 low bits; 4..8 combine nibbles with top bits.
            let sc = Tensor::cat(
                &[
                    lo.bitwise_and(63),
                    hi.bitwise_and(0xF).bitwise_or_tensor(
                        &lo.bitwise_right_shift_tensor_scalar(6)
                            .bitwise_left_shift_tensor_scalar(4),
                    ),
                ],
                1,
            );
            let mn = Tensor::cat(
                &[
                    mid.bitwise_and(63),
                    hi.bitwise_right_shift_tensor_scalar(4).bitwise_or_tensor(
                        &mid.bitwise_right_shift_tensor_scalar(6)
                            .bitwise_left_shift_tensor_scalar(4),
                    ),
                ],
                1,
            );
            let qs = cols(&b, 16, 128).view([nb, 4, 1, 32]);
            let q = Tensor::cat(
                &[qs.bitwise_and(0xF), qs.bitwise_right_shift_tensor_scalar(4)],
                2,
            )
            .view([nb, 8, 32])
            .to_kind(Kind::Float);
            let d1 = (&d * sc.to_kind(Kind::Float)).unsqueeze(-1);
            let m1 = (&dmin * mn.to_kind(Kind::Float)).unsqueeze(-1);
            (d1 * q - m1).view([-1])
        }
        GgmlType::Q6K => {
            let b = t.view([-1, 210]);
            let nb = b.size()[0];
            let ql = cols(&b, 0, 128).view([nb, 2, 2, 32]);
            let qh = cols(&b, 128, 64).view([nb, 2, 1, 32]);
            let scales = b
                .narrow(1, 192, 16)
                .contiguous()
                .view_dtype(Kind::Int8)
                .to_kind(Kind::Float);
            let d = f16_field(&b, 208);
            let low = Tensor::cat(
                &[ql.bitwise_and(0xF), ql.bitwise_right_shift_tensor_scalar(4)],
                2,
            );
            let shifts = Tensor::from_slice(&[0i32, 2, 4, 6]).view([1, 1, 4, 1]);
            let high = qh
                .bitwise_right_shift(&shifts)
                .bitwise_and(3)
                .bitwise_left_shift_tensor_scalar(4);
            let q = (low.bitwise_or_tensor(&high) - 32)
                .view([nb, 256])
                .to_kind(Kind::Float);
            let sc = (d * scales).repeat_interleave_self_int(16, Some(1), None::<i64>);
            (sc * q).view([-1])
        }
        GgmlType::Other(_) => {
            return Err(EngineError::unsupported(
                format!("dequantising {}", ty.name()),
                Some("supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K"),
            ));
        }
    };
    if out.numel() as i64 != numel {
        return Err(EngineError::invalid(
            "raw",
            format!(
                "{} bytes of {} hold {} elements, expected {numel}",
                raw.len(),
                ty.name(),
                out.numel()
            ),
        ));
    }
    Ok(out.to_device(Device::Cpu))
}

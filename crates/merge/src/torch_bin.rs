//! PyTorch `.bin` state dicts as `torch.save` writes them: a stored (uncompressed)
//! zip with `data.pkl` (pickle protocol 2), one `data/K` record per tensor storage,
//! `byteorder` and `version`, records aligned to 64 bytes for `mmap=True`.
//!
//! tch cannot write this (its savers write the libtorch C++ archive), and
//! `serde-pickle` cannot emit GLOBAL/REDUCE/BINPERSID, so the pickle is emitted
//! here with only the opcodes `torch.load(weights_only=True)` allows. The zip
//! container comes from the `zip` crate.

use crate::dtype::DType;
use crate::error::{MergeError, Result};
use crate::st::TensorSpec;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::Path;

const PROTO: u8 = 0x80;
const EMPTY_DICT: u8 = b'}';
const EMPTY_TUPLE: u8 = b')';
const MARK: u8 = b'(';
const TUPLE: u8 = b't';
const SETITEMS: u8 = b'u';
const BINUNICODE: u8 = b'X';
const GLOBAL: u8 = b'c';
const BINPERSID: u8 = b'Q';
const REDUCE: u8 = b'R';
const NEWFALSE: u8 = 0x89;
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const BININT: u8 = b'J';
const LONG1: u8 = 0x8a;
const STOP: u8 = b'.';

fn storage_class(d: DType) -> &'static str {
    match d {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
    }
}

/// A pickle protocol-2 emitter for the opcodes `torch.load(weights_only=True)` accepts.
#[derive(Debug, Default)]
pub struct Pickler {
    /// The bytes so far.
    pub out: Vec<u8>,
}

impl Pickler {
    fn op(&mut self, op: u8) {
        self.out.push(op);
    }

    /// A str.
    pub fn string(&mut self, s: &str) {
        self.op(BINUNICODE);
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    /// A non-negative int in the shortest allowed form.
    pub fn int(&mut self, v: u64) {
        if v < 256 {
            self.op(BININT1);
            self.out.push(v as u8);
        } else if v < 65536 {
            self.op(BININT2);
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v < (1 << 31) {
            self.op(BININT);
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, with a zero byte if the top bit is set.
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1
                && bytes[bytes.len() - 1] == 0
                && bytes[bytes.len() - 2] & 0x80 == 0
            {
                bytes.pop();
            }
            if bytes[bytes.len() - 1] & 0x80 != 0 {
                bytes.push(0);
            }
            self.op(LONG1);
            self.out.push(bytes.len() as u8);
            self.out.extend_from_slice(&bytes);
        }
    }

    /// `module.name` as a GLOBAL.
    pub fn global(&mut self, module: &str, name: &str) {
        self.op(GLOBAL);
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }

    /// A tuple of ints.
    pub fn int_tuple(&mut self, v: &[u64]) {
        if v.is_empty() {
            self.op(EMPTY_TUPLE);
            return;
        }
        self.op(MARK);
        for &x in v {
            self.int(x);
        }
        self.op(TUPLE);
    }

    /// `torch._utils._rebuild_tensor_v2(storage(key), 0, shape, stride, False, OrderedDict())`.
    pub fn tensor(&mut self, key: &str, dtype: DType, shape: &[usize]) {
        let numel: usize = shape.iter().product();
        let mut stride = vec![0u64; shape.len()];
        let mut acc = 1u64;
        for i in (0..shape.len()).rev() {
            stride[i] = acc;
            acc *= shape[i] as u64;
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(MARK);
        // persistent id ('storage', torch.XStorage, key, 'cpu', numel)
        self.op(MARK);
        self.string("storage");
        self.global("torch", storage_class(dtype));
        self.string(key);
        self.string("cpu");
        self.int(numel as u64);
        self.op(TUPLE);
        self.op(BINPERSID);
        self.int(0);
        self.int_tuple(&shape.iter().map(|&x| x as u64).collect::<Vec<_>>());
        self.int_tuple(&stride);
        self.op(NEWFALSE);
        self.global("collections", "OrderedDict");
        self.op(EMPTY_TUPLE);
        self.op(REDUCE);
        self.op(TUPLE);
        self.op(REDUCE);
    }
}

/// The `data.pkl` of a state dict `{name: tensor}` whose storages are `data/0`, `data/1`, … in order.
pub fn state_dict_pickle(specs: &[TensorSpec]) -> Vec<u8> {
    let mut p = Pickler::default();
    p.op(PROTO);
    p.out.push(2);
    p.op(EMPTY_DICT);
    if !specs.is_empty() {
        p.op(MARK);
        for (i, s) in specs.iter().enumerate() {
            p.string(&s.name);
            p.tensor(&i.to_string(), s.dtype, &s.shape);
        }
        p.op(SETITEMS);
    }
    p.op(STOP);
    p.out
}

/// Writes a `torch.save`-compatible state dict to `path`, calling `produce(i)` for the
/// little-endian bytes of tensor `i` (streamed: one tensor in memory at a time).
pub fn write_state_dict(
    path: &Path,
    specs: &[TensorSpec],
    produce: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let file = File::create(path).map_err(|e| MergeError::io(path, e))?;
    let w = write_to(
        BufWriter::with_capacity(1 << 20, file),
        specs,
        produce,
        path,
    )?;
    let f = w
        .into_inner()
        .map_err(|e| MergeError::io(path, e.into_error()))?;
    f.sync_all().map_err(|e| MergeError::io(path, e))
}

fn write_to<W: Write + Seek>(
    w: W,
    specs: &[TensorSpec],
    produce: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
    path: &Path,
) -> Result<W> {
    let zerr = |e: zip::result::ZipError| MergeError::io(path, std::io::Error::other(e));
    let ioerr = |e: std::io::Error| MergeError::io(path, e);
    let mut z = zip::ZipWriter::new(w);
    let total: u64 = specs.iter().map(TensorSpec::nbytes).sum();
    let opts = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(total >= u32::MAX as u64 / 2);
    let root = "archive";
    z.start_file_aligned(format!("{root}/data.pkl"), opts, 64)
        .map_err(zerr)?;
    z.write_all(&state_dict_pickle(specs)).map_err(ioerr)?;
    z.start_file_aligned(format!("{root}/byteorder"), opts, 64)
        .map_err(zerr)?;
    z.write_all(b"little").map_err(ioerr)?;
    for (i, s) in specs.iter().enumerate() {
        let bytes = produce(i)?;
        if bytes.len() as u64 != s.nbytes() {
            return Err(MergeError::Check(format!(
                "internal: tensor `{}` produced {} bytes, expected {}",
                s.name,
                bytes.len(),
                s.nbytes()
            )));
        }
        let o = opts.large_file(s.nbytes() >= u32::MAX as u64 / 2);
        z.start_file_aligned(format!("{root}/data/{i}"), o, 64)
            .map_err(zerr)?;
        z.write_all(&bytes).map_err(ioerr)?;
    }
    z.start_file_aligned(format!("{root}/version"), opts, 64)
        .map_err(zerr)?;
    z.write_all(b"3\n").map_err(ioerr)?;
    z.start_file_aligned(format!("{root}/.data/serialization_id"), opts, 64)
        .map_err(zerr)?;
    z.write_all(b"lora-trainer-merge").map_err(ioerr)?;
    z.finish().map_err(zerr)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ints_use_the_shortest_opcode() {
        let mut p = Pickler::default();
        p.int(5);
        p.int(300);
        p.int(70_000);
        p.int(1 << 33);
        assert_eq!(&p.out[..2], &[BININT1, 5]);
        assert_eq!(&p.out[2..5], &[BININT2, 0x2c, 0x01]);
        assert_eq!(p.out[5], BININT);
        assert_eq!(&p.out[10..], &[LONG1, 5, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn pickle_has_only_weights_only_opcodes() {
        let specs = [TensorSpec {
            name: "w".into(),
            dtype: DType::BF16,
            shape: vec![2, 3],
        }];
        let pkl = state_dict_pickle(&specs);
        assert_eq!(&pkl[..3], &[PROTO, 2, EMPTY_DICT]);
        assert_eq!(*pkl.last().unwrap(), STOP);
        let text = String::from_utf8_lossy(&pkl);
        assert!(text.contains("torch\nBFloat16Storage\n"));
        assert!(text.contains("torch._utils\n_rebuild_tensor_v2\n"));
    }
}

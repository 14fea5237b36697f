//! Matrix products of the training pass on the engine's own f32 GEMM.
//!
//! libtorch multiplies fp32 matrices with MKL. On AMD processors MKL takes
//! its AVX2 code path even where the core has AVX-512, and reaches about
//! 40 % of such a core's peak (docs/BENCHMARKS.md, "GEMM"). The `gemm` crate
//! picks AVX-512 or AVX2+FMA kernels at run time and is faster than MKL on
//! both kinds of AMD core measured here. [`mm_into`] runs one product with
//! it, split by rows (or by columns when the output is wide and short) over
//! libtorch's own OpenMP team ([`kernels::parallel_rows`]): each thread runs
//! a single-threaded product on its part, so no second thread pool competes
//! with libgomp's spinning workers.
//!
//! Which GEMM runs is fixed for the process: `LORA_TRAINER_GEMM=native` or
//! `libtorch` chooses; otherwise the native one on AMD x86-64 processors with
//! AVX2 and FMA, libtorch's everywhere else (on Intel processors MKL takes
//! its own AVX-512 path). Tensors the native GEMM cannot take (not f32, not
//! on the CPU, not 2-D) always go to libtorch.
//!
//! Invariant: the same mathematics as `torch.mm` / `addmm_` in f32; the
//! summation order differs from MKL's, so results agree within f32 rounding,
//! not bit for bit. For a given backend, thread count and shapes the split
//! and the result are deterministic (a run and its resume compute the same
//! losses). The native GEMM only writes an output whose memory meets
//! neither operand and whose strides name distinct elements (checked; other
//! products go to libtorch).

#![allow(unsafe_code)]

use std::cell::Cell;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::error::{EngineError, Result};
use crate::kernels;

/// The GEMM the training pass uses for f32 CPU products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The `gemm` crate on libtorch's OpenMP team.
    Native,
    /// libtorch's `mm` (MKL on x86-64).
    Libtorch,
}

impl Backend {
    /// `native` or `libtorch` (the values of [`BACKEND_ENV`]).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Native => "native",
            Backend::Libtorch => "libtorch",
        }
    }
}

/// The environment variable that overrides [`default_backend`].
pub const BACKEND_ENV: &str = "LORA_TRAINER_GEMM";

thread_local! {
    /// [`with_backend`]'s choice for this thread.
    static OVERRIDE: Cell<Option<Backend>> = const { Cell::new(None) };
}

/// The backend for products started on this thread: [`with_backend`]'s
/// choice inside it, else the process's (read once).
pub fn backend() -> Backend {
    OVERRIDE.with(Cell::get).unwrap_or_else(process_backend)
}

/// Runs `f` with `backend` for the products this thread starts (the fused
/// pass's tests run both backends whatever the CPU).
pub fn with_backend<R>(backend: Backend, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Backend>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(backend))));
    f()
}

/// `LORA_TRAINER_GEMM`, else [`default_backend`] (read once).
fn process_backend() -> Backend {
    static BACKEND: OnceLock<Backend> = OnceLock::new();
    *BACKEND.get_or_init(|| {
        let Ok(value) = std::env::var(BACKEND_ENV) else {
            return default_backend();
        };
        let named = [Backend::Native, Backend::Libtorch]
            .into_iter()
            .find(|b| b.name() == value);
        named.unwrap_or_else(|| {
            tracing::warn!(
                "{BACKEND_ENV}={value:?} is neither `native` nor `libtorch`; using the default"
            );
            default_backend()
        })
    })
}

/// Native on AMD x86-64 with AVX2 and FMA, else libtorch.
pub fn default_backend() -> Backend {
    #[cfg(target_arch = "x86_64")]
    {
        if is_amd() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Backend::Native;
        }
    }
    Backend::Libtorch
}

/// Whether CPUID's vendor string is AMD's.
#[cfg(target_arch = "x86_64")]
fn is_amd() -> bool {
    // SAFETY: CPUID leaf 0 exists on every x86-64 processor.
    #[allow(unused_unsafe)]
    let r = unsafe { std::arch::x86_64::__cpuid(0) };
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    &v == b"AuthenticAMD"
}

/// `[rows, cols]` of a 2-D tensor.
fn dims(name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match t.size()[..] {
        [r, c] => Ok((r as usize, c as usize)),
        ref s => Err(EngineError::invalid(
            name,
            format!("a matrix product needs 2-D tensors, got shape {s:?}"),
        )),
    }
}

/// The byte range `t`'s elements occupy.
fn span(t: &Tensor) -> (usize, usize) {
    let start = t.data_ptr() as usize;
    let last: i64 = t
        .size()
        .iter()
        .zip(t.stride())
        .map(|(s, st)| (s - 1).max(0) * st)
        .sum();
    (start, start + (last as usize + 1) * 4)
}

/// Element strides `(row, col)` of a 2-D tensor.
fn strides(t: &Tensor) -> (isize, isize) {
    let s = t.stride();
    (s[0] as isize, s[1] as isize)
}

/// A raw pointer handed to the team's threads.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: each thread writes a disjoint block of the output and only reads
// the operands (see `mm_into`).
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    /// The pointer (a method, so closures capture the whole `Ptr`).
    fn at(self, offset: isize) -> *mut f32 {
        self.0.wrapping_offset(offset)
    }
}

/// Rows (or columns) per unit of the split between threads.
const BLOCK: usize = 16;

/// Whether the native GEMM takes this product: the native backend, f32 CPU
/// tensors, an output whose elements are distinct (no zero or negative
/// strides) and whose memory range does not meet either operand's (a
/// conservative test: interleaved views of one buffer go to libtorch).
fn native_eligible(out: &Tensor, a: &Tensor, b: &Tensor) -> bool {
    if backend() != Backend::Native
        || ![out, a, b]
            .iter()
            .all(|t| t.kind() == Kind::Float && t.device() == Device::Cpu)
    {
        return false;
    }
    let size = out.size();
    let aliased = out
        .stride()
        .iter()
        .zip(&size)
        .any(|(&st, &sz)| st < 0 || (st == 0 && sz > 1));
    let os = span(out);
    let meets = |t: &Tensor| {
        let x = span(t);
        os.0 < x.1 && x.0 < os.1
    };
    !aliased && !meets(a) && !meets(b)
}

/// `out ← a·b`, or `out += a·b` when `accumulate` (`a` `[m, k]`, `b` `[k, n]`,
/// `out` `[m, n]`; any strides, so transposed and narrowed views need no
/// copy).
pub fn mm_into(out: &Tensor, a: &Tensor, b: &Tensor, accumulate: bool) -> Result<()> {
    let (m, k) = dims("a", a)?;
    let (kb, n) = dims("b", b)?;
    let (mo, no) = dims("out", out)?;
    if kb != k || mo != m || no != n {
        return Err(EngineError::invalid(
            "b",
            format!("cannot multiply [{m}, {k}] by [{kb}, {n}] into [{mo}, {no}]"),
        ));
    }
    if !native_eligible(out, a, b) {
        if accumulate {
            let _ = out.shallow_clone().f_addmm_(a, b)?;
        } else {
            let _ = a.f_mm_out(out, b)?;
        }
        return Ok(());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (o_rs, o_cs) = strides(out);
    let (a_rs, a_cs) = strides(a);
    let (b_rs, b_cs) = strides(b);
    let (po, pa, pb) = (
        Ptr(out.data_ptr() as *mut f32),
        Ptr(a.data_ptr() as *mut f32),
        Ptr(b.data_ptr() as *mut f32),
    );
    // Split the rows unless the output is short and wide.
    let by_rows = m >= 8 * BLOCK || m >= n;
    let total = if by_rows { m } else { n };
    let blocks = total.div_ceil(BLOCK);
    let other = if by_rows { n } else { m };
    let f = move |s: usize, e: usize| {
        let (s, e) = (s * BLOCK, (e * BLOCK).min(total));
        let len = e - s;
        // SAFETY: the offsets stay inside the tensors (s < e ≤ m or n); each
        // thread writes only its rows (columns) of `out`, which overlaps
        // neither operand; the operands are only read; all three outlive
        // the call (the team joins before `parallel_rows` returns).
        unsafe {
            let (dst, lhs, rhs, mm, nn) = if by_rows {
                (
                    po.at(s as isize * o_rs),
                    pa.at(s as isize * a_rs) as *const f32,
                    pb.at(0) as *const f32,
                    len,
                    n,
                )
            } else {
                (
                    po.at(s as isize * o_cs),
                    pa.at(0) as *const f32,
                    pb.at(s as isize * b_cs) as *const f32,
                    m,
                    len,
                )
            };
            gemm_serial(
                (mm, nn, k),
                (dst, o_rs, o_cs),
                accumulate,
                (lhs, a_rs, a_cs),
                (rhs, b_rs, b_cs),
                1.0,
            );
        }
    };
    kernels::parallel_rows(blocks, (BLOCK * k * other / 8).max(1), &f);
    Ok(())
}

/// `dst ← β·lhs·rhs`, or `dst += β·lhs·rhs` when `accumulate`, on the
/// calling thread with the native GEMM (whatever [`backend`] says: callers
/// choose). `lhs` is `[m, k]`, `rhs` `[k, n]`, `dst` `[m, n]`; strides are in
/// elements, `(row, column)`.
///
/// # Safety
/// The pointers are valid for their shapes and strides, `dst` meets neither
/// operand and no other thread reads or writes `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_serial(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    accumulate: bool,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    beta: f32,
) {
    // SAFETY: per the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2,
            dst.1,
            accumulate,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            1.0f32,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `a·b` in a new contiguous `[m, n]` tensor.
pub fn mm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, _) = dims("a", a)?;
    let (_, n) = dims("b", b)?;
    let out = Tensor::empty([m as i64, n as i64], (a.kind(), a.device()));
    mm_into(&out, a, b, false)?;
    Ok(out)
}

/// `bias + a·b` (bias `[n]`, broadcast over rows) in a new `[m, n]` tensor.
pub fn addmm(bias: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, _) = dims("a", a)?;
    let (_, n) = dims("b", b)?;
    let out = bias.f_expand([m as i64, n as i64], false)?.f_contiguous()?;
    mm_into(&out, a, b, true)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `out ← a·b` and `out += a·b` against libtorch's `mm` in f64, over
    /// transposed, narrowed and skinny operands, both split directions and an
    /// empty inner dimension.
    #[test]
    fn products_match_libtorch_on_every_layout() {
        with_backend(Backend::Native, products_match_libtorch);
    }

    fn products_match_libtorch() {
        tch::manual_seed(3);
        let f = (Kind::Float, Device::Cpu);
        for &(m, k, n) in &[
            (1024, 256, 704),
            (16, 1024, 704),
            (48, 1024, 256),
            (1024, 704, 16),
            (37, 19, 53),
            (1, 5, 1),
            (200, 0, 30),
        ] {
            for transpose_a in [false, true] {
                for transpose_b in [false, true] {
                    let a = if transpose_a {
                        Tensor::randn([k, m], f).tr()
                    } else {
                        Tensor::randn([m, k], f)
                    };
                    let b = if transpose_b {
                        Tensor::randn([n, k], f).tr()
                    } else {
                        Tensor::randn([k, n], f)
                    };
                    let want = a.to_kind(Kind::Double).mm(&b.to_kind(Kind::Double));
                    let got = mm(&a, &b).unwrap();
                    let tol = 1e-5 * (k as f64).sqrt().max(1.0);
                    let err = (got.to_kind(Kind::Double) - &want)
                        .abs()
                        .max()
                        .double_value(&[]);
                    assert!(
                        err <= tol,
                        "{m}x{k}x{n} ta={transpose_a} tb={transpose_b}: {err}"
                    );
                    // Accumulating into a narrowed view of a wider buffer.
                    let wide = Tensor::randn([m, n + 3], f);
                    let view = wide.narrow(1, 2, n);
                    // These products are the native GEMM's, not libtorch's.
                    assert!(native_eligible(&view, &a, &b));
                    let before = view.to_kind(Kind::Double);
                    mm_into(&view, &a, &b, true).unwrap();
                    let err = (view.to_kind(Kind::Double) - (before + &want))
                        .abs()
                        .max()
                        .double_value(&[]);
                    assert!(err <= 2.0 * tol, "accumulate {m}x{k}x{n}: {err}");
                }
            }
        }
    }

    #[test]
    fn bias_is_broadcast_over_rows() {
        with_backend(Backend::Native, bias_broadcast);
    }

    fn bias_broadcast() {
        let f = (Kind::Float, Device::Cpu);
        let a = Tensor::randn([300, 20], f);
        let b = Tensor::randn([10, 20], f).tr();
        let bias = Tensor::randn([10], f);
        let got = addmm(&bias, &a, &b).unwrap();
        let want = bias.addmm(&a, &b);
        assert!(got.allclose(&want, 1e-5, 1e-5, false));
    }

    #[test]
    fn bad_shapes_are_errors_and_overlapping_views_still_multiply() {
        with_backend(Backend::Native, bad_shapes_and_overlaps);
    }

    fn bad_shapes_and_overlaps() {
        let f = (Kind::Float, Device::Cpu);
        let a = Tensor::randn([4, 3], f);
        let e = mm(&a, &Tensor::randn([4, 2], f)).unwrap_err().to_string();
        assert!(e.contains("cannot multiply [4, 3] by [4, 2]"), "{e}");
        let e = mm(&Tensor::randn([2, 2, 2], f), &a)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2-D"), "{e}");
        // Interleaved column blocks of one buffer: disjoint elements, so the
        // product is well defined (libtorch computes it).
        let buf = Tensor::randn([4, 6], f);
        let w = Tensor::randn([3, 3], f);
        let want = buf.narrow(1, 3, 3).mm(&w);
        mm_into(&buf.narrow(1, 0, 3), &buf.narrow(1, 3, 3), &w, false).unwrap();
        assert!(buf.narrow(1, 0, 3).allclose(&want, 1e-6, 1e-6, false));
        // An output whose rows are one memory row is refused, not raced on.
        let out = Tensor::zeros([3], f).expand([4, 3], false);
        assert!(mm_into(&out, &a, &Tensor::eye(3, f), false).is_err());
    }
}

//! Fused elementwise kernels for the training pass, run on libtorch's own
//! OpenMP threads.
//!
//! libtorch offers SwiGLU, RMSNorm and the softmax gradient only as chains of
//! elementwise operators, each a full pass over memory with its own dispatch
//! and thread fork/join. These kernels do each chain in one pass over rows.
//! They run their rows on the OpenMP team libtorch itself uses (libgomp's
//! `GOMP_parallel`, looked up in the process with `dlsym`): a second thread
//! pool would compete for the cores with libgomp's workers, which spin after
//! every parallel region. Without libgomp (a libtorch built with another
//! OpenMP runtime), the rows run on the calling thread.
//!
//! Invariant: every kernel computes the same mathematics as the libtorch
//! operators it replaces, in f32, within a few ulp (`exp` is a polynomial
//! with ~2 ulp error instead of Sleef's 1); the tests compare each kernel with
//! the operator chain. Tensors are checked to be contiguous f32 CPU tensors
//! of the expected shapes; anything else is an error, never undefined
//! behaviour.

#![allow(unsafe_code)]

use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::error::{EngineError, Result};

type GompFn = unsafe extern "C" fn(*mut c_void);
type GompParallel = unsafe extern "C" fn(GompFn, *mut c_void, c_uint, c_uint);
type OmpInt = unsafe extern "C" fn() -> c_int;

/// libgomp's entry points, when the process has them.
struct Gomp {
    parallel: GompParallel,
    thread_num: OmpInt,
    num_threads: OmpInt,
    max_threads: OmpInt,
}

fn gomp() -> Option<&'static Gomp> {
    static GOMP: OnceLock<Option<Gomp>> = OnceLock::new();
    GOMP.get_or_init(|| {
        let sym = |name: &[u8]| {
            // SAFETY: `name` is NUL-terminated; RTLD_DEFAULT searches the
            // libraries already loaded (libtorch's libgomp among them).
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr().cast()) };
            (!p.is_null()).then_some(p)
        };
        let (p, t, n, m) = (
            sym(b"GOMP_parallel\0")?,
            sym(b"omp_get_thread_num\0")?,
            sym(b"omp_get_num_threads\0")?,
            sym(b"omp_get_max_threads\0")?,
        );
        // SAFETY: these symbols have these C signatures in libgomp's ABI
        // (the one compilers target for `#pragma omp parallel`).
        unsafe {
            Some(Gomp {
                parallel: std::mem::transmute::<*mut c_void, GompParallel>(p),
                thread_num: std::mem::transmute::<*mut c_void, OmpInt>(t),
                num_threads: std::mem::transmute::<*mut c_void, OmpInt>(n),
                max_threads: std::mem::transmute::<*mut c_void, OmpInt>(m),
            })
        }
    })
    .as_ref()
}

/// Rows below this many elements of work run on the calling thread
/// (libtorch's own grain size).
const GRAIN: usize = 32_768;

/// Calls `f(start, end)` over `[0, rows)` split into one contiguous range per
/// thread of libtorch's OpenMP team (`work_per_row` sizes the decision to go
/// parallel at all). `f` must only touch the rows it is given.
pub fn parallel_rows(rows: usize, work_per_row: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    let team = gomp().filter(|_| rows > 1 && rows.saturating_mul(work_per_row) >= GRAIN);
    let Some(g) = team else {
        f(0, rows);
        return;
    };
    // SAFETY: plain queries of the calling thread's OpenMP state.
    let max = unsafe { (g.max_threads)() }.max(1) as usize;
    if max == 1 {
        f(0, rows);
        return;
    }
    type Panic = Box<dyn std::any::Any + Send>;
    struct Job<'a> {
        rows: usize,
        f: &'a (dyn Fn(usize, usize) + Sync),
        g: &'a Gomp,
        panic: std::sync::Mutex<Option<Panic>>,
    }
    unsafe extern "C" fn body(data: *mut c_void) {
        // SAFETY: `data` is the `Job` below, alive until GOMP_parallel
        // returns (it joins every thread before returning).
        let job = unsafe { &*(data as *const Job<'_>) };
        // SAFETY: called inside the parallel region.
        let (id, n) = unsafe { ((job.g.thread_num)(), (job.g.num_threads)()) };
        let (id, n) = (id.max(0) as usize, n.max(1) as usize);
        let per = job.rows.div_ceil(n);
        let start = (id * per).min(job.rows);
        let end = (start + per).min(job.rows);
        if start < end {
            // A panic must not unwind into C: it is kept and resumed on the
            // calling thread once the team has joined.
            if let Err(p) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.f)(start, end)))
            {
                let mut slot = job.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
        }
    }
    let job = Job {
        rows,
        f,
        g,
        panic: std::sync::Mutex::new(None),
    };
    // SAFETY: `body` has the outlined-function signature GOMP_parallel
    // expects; `job` outlives the call; threads = 0 asks for the team size
    // libtorch set (`omp_set_num_threads`), flags = 0.
    unsafe {
        (g.parallel)(body, &job as *const Job<'_> as *mut c_void, 0, 0);
    }
    let panic = job.panic.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = panic {
        std::panic::resume_unwind(p);
    }
}

/// Raw f32 rows of a contiguous CPU tensor, shared across threads by index.
#[derive(Clone, Copy)]
struct Rows {
    ptr: *mut f32,
    cols: usize,
}

// SAFETY: the kernels hand each thread disjoint rows of the outputs and
// only read the inputs.
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

impl Rows {
    /// Row `i` (read).
    ///
    /// # Safety
    /// `i` is in range and nothing writes the row meanwhile.
    unsafe fn row(&self, i: usize) -> &[f32] {
        // SAFETY: per the caller.
        unsafe { std::slice::from_raw_parts(self.ptr.add(i * self.cols), self.cols) }
    }

    /// Row `i` (write).
    ///
    /// # Safety
    /// `i` is in range and no other thread touches the row.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row_mut(&self, i: usize) -> &mut [f32] {
        // SAFETY: per the caller.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.cols), self.cols) }
    }
}

/// The rows of `t` as `[rows, cols]` after checking it is a contiguous f32
/// CPU tensor with `cols` as its last dimension.
fn rows_of(name: &str, t: &Tensor, cols: usize) -> Result<(usize, Rows)> {
    let size = t.size();
    if t.kind() != Kind::Float
        || t.device() != Device::Cpu
        || !t.is_contiguous()
        || size.last().copied() != Some(cols as i64)
    {
        return Err(EngineError::invalid(
            name,
            format!(
                "a fused kernel needs a contiguous f32 CPU tensor with {cols} columns, got {:?} {:?} on {:?}",
                t.kind(),
                size,
                t.device()
            ),
        ));
    }
    let rows = t.numel() / cols.max(1);
    Ok((
        rows,
        Rows {
            ptr: t.data_ptr() as *mut f32,
            cols,
        },
    ))
}

/// A new contiguous tensor shaped as `like`.
fn empty_like(like: &Tensor) -> Tensor {
    Tensor::empty(like.size(), (Kind::Float, Device::Cpu))
}

/// `exp(x)` in f32 (Cephes' polynomial after a range reduction by ln 2;
/// ~2 ulp; below e^-86 the result may flush to zero). Plain arithmetic only (no libm calls, no branches, rounding by
/// the 1.5·2²³ trick), so that loops over it vectorise on any x86 target.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³
    let x = x.clamp(-87.336_55, 88.376_26);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // x − n·ln2 in two parts.
    let r = x - n * 0.693_359_4;
    let r = r + n * 2.121_944_4e-4;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5e-1;
    let y = p * r2 + r + 1.0;
    // SAFETY: after the clamp n is an integer in [-126, 128].
    let e: i32 = unsafe { n.to_int_unchecked() };
    // 2^n by the exponent bits (n = 128 only for x ≥ 88.3, where y·2^127·2
    // is formed as two factors to stay finite).
    let half = f32::from_bits(((e + 126) as u32) << 23);
    y * half * 2.0
}

/// `σ(x) = 1 / (1 + e^{-x})`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Runs `body` compiled for AVX2 + FMA when the CPU has them (the generic
/// build targets SSE2), else as is.
macro_rules! dispatch {
    ($vis:vis $name:ident ( $($arg:ident : $ty:ty),* ) $body:block) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were detected on this CPU.
                    unsafe { wide($($arg),*) };
                    return;
                }
            }
            $body
        }
    };
}

dispatch!(swiglu_rows(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
});

dispatch!(swiglu_back_rows(d: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for ((((dg, du), &d), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(d).zip(g).zip(u) {
        let s = sigmoid(g);
        *du = d * g * s;
        // silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
        *dg = d * u * (s * g.mul_add(1.0 - s, 1.0));
    }
});

/// `silu(gate) · up` (`[N, I]` each) in one pass.
pub fn swiglu_forward(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let cols = gate.size().last().copied().unwrap_or(0) as usize;
    let (n, g) = rows_of("gate", gate, cols)?;
    let (nu, u) = rows_of("up", up, cols)?;
    if nu != n {
        return Err(EngineError::invalid("up", "gate and up differ in rows"));
    }
    let out = empty_like(gate);
    let (_, o) = rows_of("out", &out, cols)?;
    parallel_rows(n, cols, &|a, b| {
        for i in a..b {
            // SAFETY: rows a..b are this thread's; inputs are only read.
            unsafe { swiglu_rows(g.row(i), u.row(i), o.row_mut(i)) };
        }
    });
    Ok(out)
}

/// The gradients `(∂gate, ∂up)` of `silu(gate) · up` for the output gradient
/// `d`, in one pass.
pub fn swiglu_backward(d: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    let cols = gate.size().last().copied().unwrap_or(0) as usize;
    let (n, g) = rows_of("gate", gate, cols)?;
    let (nu, u) = rows_of("up", up, cols)?;
    let (nd, dr) = rows_of("d_act", d, cols)?;
    if nu != n || nd != n {
        return Err(EngineError::invalid(
            "d_act",
            "gate, up and d_act differ in rows",
        ));
    }
    let (dg, du) = (empty_like(gate), empty_like(up));
    let (_, dgr) = rows_of("d_gate", &dg, cols)?;
    let (_, dur) = rows_of("d_up", &du, cols)?;
    parallel_rows(n, 3 * cols, &|a, b| {
        for i in a..b {
            // SAFETY: rows a..b of the outputs are this thread's.
            unsafe {
                swiglu_back_rows(
                    dr.row(i),
                    g.row(i),
                    u.row(i),
                    dgr.row_mut(i),
                    dur.row_mut(i),
                )
            };
        }
    });
    Ok((dg, du))
}

dispatch!(rms_rows(x: &[f32], w: &[f32], eps: f32, xn: &mut [f32], h: &mut [f32], r_out: &mut f32) {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += c[k] * c[k];
        }
    }
    let ss = acc.iter().sum::<f32>() + tail.iter().map(|v| v * v).sum::<f32>();
    let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for (((xn, h), &x), &w) in xn.iter_mut().zip(h.iter_mut()).zip(x).zip(w) {
        let v = x * r;
        *xn = v;
        *h = v * w;
    }
    *r_out = r;
});

dispatch!(rms_back_rows(dh: &[f32], w: &[f32], xn: &[f32], r: f32, acc: Option<&[f32]>, out: &mut [f32]) {
    let mut part = [0.0f32; LANES];
    let n = dh.len();
    let whole = n - n % LANES;
    for j in (0..whole).step_by(LANES) {
        for k in 0..LANES {
            part[k] += dh[j + k] * w[j + k] * xn[j + k];
        }
    }
    let mut dot = part.iter().sum::<f32>();
    for j in whole..n {
        dot += dh[j] * w[j] * xn[j];
    }
    let c = dot / n as f32;
    match acc {
        Some(acc) => {
            for j in 0..n {
                out[j] = acc[j] + r * (dh[j] * w[j] - xn[j] * c);
            }
        }
        None => {
            for j in 0..n {
                out[j] = r * (dh[j] * w[j] - xn[j] * c);
            }
        }
    }
});

/// RMSNorm of the rows of `x` (`[N, H]`) with weight `w` (`[H]`): returns
/// `(xn, r, h)` with `r = 1 / sqrt(mean(x²) + eps)` (`[N, 1]`), `xn = x·r`
/// and `h = xn ⊙ w`, in one pass over each row.
pub fn rms_norm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let cols = w.numel();
    let (n, xr) = rows_of("x", x, cols)?;
    let (_, wr) = rows_of("weight", w, cols)?;
    let (xn, h) = (empty_like(x), empty_like(x));
    let r = Tensor::empty([n as i64, 1], (Kind::Float, Device::Cpu));
    let (_, xnr) = rows_of("xn", &xn, cols)?;
    let (_, hr) = rows_of("h", &h, cols)?;
    let rs = Slots {
        ptr: r.data_ptr() as *mut f32,
    };
    parallel_rows(n, 3 * cols, &|a, b| {
        for i in a..b {
            let mut ri = 0.0;
            // SAFETY: rows a..b of the outputs are this thread's.
            unsafe {
                rms_rows(
                    xr.row(i),
                    wr.row(0),
                    eps as f32,
                    xnr.row_mut(i),
                    hr.row_mut(i),
                    &mut ri,
                );
                rs.set(i, ri);
            }
        }
    });
    Ok((xn, r, h))
}

/// Gradient of `h = w ⊙ xn` (`xn = x·r`, from [`rms_norm_forward`]) with
/// respect to `x` for the output gradient `dh`, added to `acc` when given:
/// `acc + r · (dh⊙w − xn · mean(dh⊙w⊙xn))`, in one pass over each row.
pub fn rms_norm_backward(
    acc: Option<&Tensor>,
    dh: &Tensor,
    w: &Tensor,
    xn: &Tensor,
    r: &Tensor,
) -> Result<Tensor> {
    let cols = w.numel();
    let (n, dhr) = rows_of("d_h", dh, cols)?;
    let (_, wr) = rows_of("weight", w, cols)?;
    let (nx, xnr) = rows_of("xn", xn, cols)?;
    let (nr, rr) = rows_of("r", r, 1)?;
    let accr = match acc {
        Some(a) => Some(rows_of("acc", a, cols)?),
        None => None,
    };
    if nx != n || nr != n || accr.as_ref().is_some_and(|(na, _)| *na != n) {
        return Err(EngineError::invalid(
            "d_h",
            "RMSNorm backward operands differ in rows",
        ));
    }
    let out = empty_like(dh);
    let (_, o) = rows_of("out", &out, cols)?;
    parallel_rows(n, 4 * cols, &|a, b| {
        for i in a..b {
            // SAFETY: rows a..b of the output are this thread's.
            unsafe {
                let acc_row = accr.as_ref().map(|(_, ar)| ar.row(i));
                rms_back_rows(
                    dhr.row(i),
                    wr.row(0),
                    xnr.row(i),
                    rr.row(i)[0],
                    acc_row,
                    o.row_mut(i),
                );
            }
        }
    });
    Ok(out)
}

/// Per-row results written by disjoint threads.
#[derive(Clone, Copy)]
struct Slots<T> {
    ptr: *mut T,
}

// SAFETY: each thread writes only the indices of its own rows.
unsafe impl<T> Send for Slots<T> {}
unsafe impl<T> Sync for Slots<T> {}

impl<T> Slots<T> {
    /// # Safety
    /// `i` is in range of the buffer and no other thread writes it.
    unsafe fn set(&self, i: usize, v: T) {
        // SAFETY: per the caller.
        unsafe { self.ptr.add(i).write(v) };
    }
}

const LANES: usize = 16;

dispatch!(pub(crate) row_max(row: &[f32], out: &mut f32) {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in acc.iter().chain(tail) {
        m = if *v > m { *v } else { m };
    }
    *out = m;
});

dispatch!(pub(crate) row_exp_sum(row: &mut [f32], max: f32, out: &mut f32) {
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            let e = exp_f32(c[k] - max);
            c[k] = e;
            acc[k] += e;
        }
    }
    let mut sum = 0.0f32;
    for v in chunks.into_remainder() {
        let e = exp_f32(*v - max);
        *v = e;
        sum += e;
    }
    *out = acc.iter().sum::<f32>() + sum;
});

dispatch!(pub(crate) row_scale(row: &mut [f32], by: f32) {
    for v in row.iter_mut() {
        *v *= by;
    }
});

// The softmax's gradient on one row: `dp ← p ⊙ (dp − dot)`, where `dot`
// is `Σ p ⊙ dp` (attention backward).
dispatch!(pub(crate) softmax_grad_row(p: &[f32], dp: &mut [f32], dot: f32) {
    for (d, &p) in dp.iter_mut().zip(p) {
        *d = p * (*d - dot);
    }
});

/// Token cross-entropy over the rows of `logits` (`[R, V]`, f32, overwritten)
/// for `targets` (one per row; negative: no target). Returns the summed loss
/// (nats, f64) and how many targets' logits equal their row's maximum
/// (arg-max up to ties). With `grad_scale = Some(s)`, `logits` is left
/// holding `s · (softmax − onehot)` for rows with a target and 0 for the
/// others (the gradient of `s · Σ loss` with respect to the logits); else its
/// contents are unspecified. One read of each row from memory: its max, its
/// exponentials and their sum, and the scaling run while it is in cache.
pub fn cross_entropy_rows(
    logits: &Tensor,
    targets: &[i64],
    grad_scale: Option<f32>,
) -> Result<(f64, i64)> {
    let vocab = logits.size().last().copied().unwrap_or(0) as usize;
    let (rows, l) = rows_of("logits", logits, vocab)?;
    if targets.len() != rows {
        return Err(EngineError::invalid(
            "targets",
            format!("{} targets for {rows} rows of logits", targets.len()),
        ));
    }
    if let Some(t) = targets.iter().find(|&&t| t >= vocab as i64) {
        return Err(EngineError::invalid(
            "targets",
            format!("target {t} is outside the vocabulary of {vocab}"),
        ));
    }
    let mut loss = vec![0.0f64; rows];
    let mut correct = vec![0u8; rows];
    let (lp, cp) = (
        Slots {
            ptr: loss.as_mut_ptr(),
        },
        Slots {
            ptr: correct.as_mut_ptr(),
        },
    );
    parallel_rows(rows, 3 * vocab, &|a, b| {
        for (i, &t) in targets.iter().enumerate().take(b).skip(a) {
            // SAFETY: row i and slot i are this thread's.
            let row = unsafe { l.row_mut(i) };
            if t < 0 {
                if grad_scale.is_some() {
                    row.fill(0.0);
                }
                continue;
            }
            let t = t as usize;
            let picked = row[t];
            let mut max = 0.0;
            row_max(row, &mut max);
            let mut sum = 0.0;
            row_exp_sum(row, max, &mut sum);
            let lse = f64::from(max) + f64::from(sum).ln();
            // SAFETY: slot i is this thread's.
            unsafe {
                lp.set(i, lse - f64::from(picked));
                cp.set(i, u8::from(picked >= max));
            }
            if let Some(s) = grad_scale {
                row_scale(row, s / sum);
                row[t] -= s;
            }
        }
    });
    Ok((
        loss.iter().sum(),
        correct.iter().map(|&c| i64::from(c)).sum(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let scale = f64::try_from(b.abs().max()).unwrap().max(1e-30);
        f64::try_from((a - b).abs().max()).unwrap() / scale
    }

    #[test]
    fn exp_matches_libm_within_a_few_ulp() {
        let mut worst = 0.0f64;
        // Below e^-86 (~4e-38, the edge of the normal range) results may
        // flush to zero.
        let mut x = -86.0f32;
        while x < 88.3 {
            let (ours, want) = (exp_f32(x), x.exp());
            worst = worst.max(((ours - want) / want).abs() as f64);
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON as f64, "relative error {worst}");
        for x in [-87.0f32, -100.0, -200.0, f32::MIN] {
            assert!((0.0..1e-37).contains(&exp_f32(x)), "{x}");
        }
        assert!(exp_f32(200.0).is_finite() && exp_f32(88.37) > 2.3e38);
    }

    #[test]
    fn swiglu_equals_the_operator_chain_both_ways() {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        // Enough rows to go parallel, and an odd width (vector tails).
        for (n, i) in [(3, 5), (300, 173)] {
            let g = Tensor::randn([n, i], opts) * 4.0;
            let u = Tensor::randn([n, i], opts);
            let d = Tensor::randn([n, i], opts);
            let ours = swiglu_forward(&g, &u).unwrap();
            assert!(max_rel(&ours, &(g.silu() * &u)) < 1e-6);
            let (dg, du) = swiglu_backward(&d, &g, &u).unwrap();
            assert!(max_rel(&du, &(&d * g.silu())) < 1e-6);
            assert!(max_rel(&dg, &g.silu_backward(&(&d * &u))) < 1e-6);
        }
    }

    #[test]
    fn cross_entropy_rows_equal_log_softmax_and_its_gradient() {
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        for (rows, vocab) in [(4, 7), (64, 1000)] {
            let logits = Tensor::randn([rows, vocab], opts) * 3.0;
            let mut targets: Vec<i64> = (0..rows).map(|i| (i * 13 + 2) % vocab).collect();
            targets[1] = -100;
            // Make row 2's target the maximum (counted as correct).
            let _ = logits.get(2).get(targets[2]).fill_(50.0);
            let work = logits.copy();
            let (loss, correct) = cross_entropy_rows(&work, &targets, Some(0.25)).unwrap();

            let logp = logits.to_kind(Kind::Double).log_softmax(1, Kind::Double);
            let probs = logp.exp();
            let mut want_loss = 0.0;
            let mut want_correct = 0;
            let want_grad = probs.zeros_like();
            for (i, &t) in targets.iter().enumerate() {
                if t < 0 {
                    continue;
                }
                want_loss -= f64::try_from(logp.get(i as i64).get(t)).unwrap();
                let row = logits.get(i as i64);
                want_correct += i64::from(
                    f64::try_from(row.get(t)).unwrap() >= f64::try_from(row.max()).unwrap(),
                );
                let g = probs.get(i as i64) * 0.25;
                let _ = g.get(t).g_sub_(&Tensor::from(0.25f64));
                want_grad.get(i as i64).copy_(&g);
            }
            assert!(
                (loss - want_loss).abs() < 1e-5 * want_loss.abs(),
                "{loss} vs {want_loss}"
            );
            assert_eq!(correct, want_correct);
            assert!(correct >= 1);
            let err = f64::try_from((work.to_kind(Kind::Double) - &want_grad).abs().max()).unwrap();
            assert!(err < 1e-6, "gradient differs by {err}");
            let e = cross_entropy_rows(&logits.copy(), &vec![vocab; rows as usize], None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("outside the vocabulary"), "{e}");
        }
    }

    #[test]
    fn rms_norm_equals_the_operator_chain_both_ways() {
        tch::manual_seed(4);
        let opts = (Kind::Float, Device::Cpu);
        for (n, h) in [(3, 5), (200, 256)] {
            let x = Tensor::randn([n, h], opts) * 2.0;
            let w = Tensor::randn([h], opts);
            let (xn, r, hh) = rms_norm_forward(&x, &w, 1e-5).unwrap();
            let want_r = (x.square().mean_dim(&[-1i64][..], true, Kind::Float) + 1e-5).rsqrt();
            assert!(max_rel(&r, &want_r) < 1e-6);
            assert!(max_rel(&xn, &(&x * &want_r)) < 1e-6);
            assert!(max_rel(&hh, &(&x * &want_r * &w)) < 1e-6);
            // Against autograd through the same formula.
            let xr = x.detach().set_requires_grad(true);
            let y =
                &xr * (xr.square().mean_dim(&[-1i64][..], true, Kind::Float) + 1e-5).rsqrt() * &w;
            let dh = Tensor::randn([n, h], opts);
            let acc = Tensor::randn([n, h], opts);
            (&y * &dh).sum(Kind::Float).backward();
            let ours = rms_norm_backward(Some(&acc), &dh, &w, &xn, &r).unwrap();
            assert!(max_rel(&(ours - &acc), &xr.grad()) < 1e-5);
            let ours = rms_norm_backward(None, &dh, &w, &xn, &r).unwrap();
            assert!(max_rel(&ours, &xr.grad()) < 1e-5);
        }
    }

    #[test]
    fn a_strided_or_wrong_tensor_is_an_error() {
        let opts = (Kind::Float, Device::Cpu);
        let g = Tensor::randn([4, 6], opts);
        let e = swiglu_forward(&g.tr(), &g.tr()).unwrap_err().to_string();
        assert!(e.contains("contiguous"), "{e}");
        let e = swiglu_forward(&g.to_kind(Kind::Double), &g)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f32"), "{e}");
    }

    #[test]
    fn rows_are_split_over_the_team_and_all_visited() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let seen: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        parallel_rows(1000, 1000, &|a, b| {
            for s in &seen[a..b] {
                s.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
        // A panic in a worker's rows reaches the caller instead of leaving
        // rows unwritten.
        let caught =
            std::panic::catch_unwind(|| parallel_rows(1000, 1000, &|a, b| panic!("rows {a}..{b}")));
        assert!(caught.is_err());
        assert!(gomp().is_some(), "libtorch's libgomp is loaded in tests");
    }
}

//! Causal self-attention of the training pass, forward and backward, on the
//! native GEMM ([`crate::matmul`]).
//!
//! libtorch's CPU flash attention multiplies its blocks with MKL, which on
//! AMD processors runs its AVX2 path; this one runs the same blocked
//! algorithm with the `gemm` crate. The work is split over libtorch's OpenMP
//! team by (sequence, head) in the forward and by (sequence, key/value head)
//! in the backward, so that the query heads sharing a key/value head (GQA)
//! add their key and value gradients on one thread, without atomics. Each
//! block of [`BLOCK`] query rows multiplies only the key columns at or before
//! its last row (causal), and the forward keeps each row's log-sum-exp so the
//! backward recomputes the probabilities instead of storing them.
//!
//! The forward writes its output straight into the `[B·T, heads·d]` rows the
//! output projection reads, and the backward reads the output gradient in
//! that layout and writes the query, key and value gradients in the
//! `[B·T, heads·d]` layouts of their projections, so no transposes are copied.
//!
//! Invariant: `softmax(scale·QKᵀ + causal mask)·V` with `scale = 1/√d` and
//! key `j` visible to query `i` iff `j ≤ i` (torch's `is_causal=True`), in
//! f32; the tests compare forward and gradients with libtorch's attention.

#![allow(unsafe_code)]

use tch::{Device, Kind, Tensor};

use crate::error::{EngineError, Result};
use crate::kernels;
use crate::matmul::gemm_serial;

/// Query rows per block.
pub const BLOCK: usize = 64;

/// A 4-D f32 tensor's data pointer and element strides (`[B, H, T, d]`).
#[derive(Clone, Copy)]
struct View {
    ptr: *mut f32,
    s: [isize; 4],
}

// SAFETY: the views are read-only operands, or outputs of which each thread
// writes only the (sequence, head) slices of its own units.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// The view of `t`, checked to be a 4-D f32 CPU tensor `[b, h, t, d]`.
    fn of(name: &str, x: &Tensor, shape: [i64; 4]) -> Result<Self> {
        if x.kind() != Kind::Float || x.device() != Device::Cpu || x.size() != shape {
            return Err(EngineError::invalid(
                name,
                format!(
                    "attention needs an f32 CPU tensor of shape {shape:?}, got {:?} {:?} on {:?}",
                    x.kind(),
                    x.size(),
                    x.device()
                ),
            ));
        }
        let st = x.stride();
        Ok(Self {
            ptr: x.data_ptr() as *mut f32,
            s: [
                st[0] as isize,
                st[1] as isize,
                st[2] as isize,
                st[3] as isize,
            ],
        })
    }

    /// Row `t` of sequence `b`, head `h`, as a GEMM operand pointer.
    fn at(self, b: usize, h: usize, t: usize) -> *mut f32 {
        self.ptr.wrapping_offset(
            b as isize * self.s[0] + h as isize * self.s[1] + t as isize * self.s[2],
        )
    }

    /// `(pointer, row stride, column stride)` of the `[T, d]` matrix from row `t`.
    fn mat(self, b: usize, h: usize, t: usize) -> (*const f32, isize, isize) {
        (self.at(b, h, t) as *const f32, self.s[2], self.s[3])
    }

    /// The same matrix transposed (`[d, T]`).
    fn mat_t(self, b: usize, h: usize, t: usize) -> (*const f32, isize, isize) {
        (self.at(b, h, t) as *const f32, self.s[3], self.s[2])
    }
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    d: usize,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor) -> Result<Self> {
        let (qs, ks) = (q.size(), k.size());
        match (&qs[..], &ks[..]) {
            ([b, nh, t, d], [kb, nkv, kt, kd])
                if b == kb && t == kt && d == kd && *nkv > 0 && nh % nkv == 0 && *t > 0 =>
            {
                Ok(Self {
                    b: *b as usize,
                    nh: *nh as usize,
                    nkv: *nkv as usize,
                    t: *t as usize,
                    d: *d as usize,
                })
            }
            _ => Err(EngineError::invalid(
                "k",
                format!(
                    "attention needs q [B, H, T, d] and k, v [B, H_kv, T, d] with H a multiple of \
                     H_kv, got q {qs:?} and k {ks:?}"
                ),
            )),
        }
    }

    fn kv_shape(self) -> [i64; 4] {
        [self.b as i64, self.nkv as i64, self.t as i64, self.d as i64]
    }
}

/// `buf[rows, cols] ← scale · Q Kᵀ` for query rows `r0..r0 + rows` of head
/// `h` in sequence `bi` against the first `cols` keys of key/value head `g`
/// (row stride `cols`).
///
/// # Safety
/// The views are checked tensors holding those rows and `d` columns, and
/// `buf` holds at least `rows · cols` floats.
unsafe fn scores(
    buf: &mut [f32],
    (rows, cols, d): (usize, usize, usize),
    q: View,
    k: View,
    (bi, h, g, r0): (usize, usize, usize, usize),
    scale: f32,
) {
    debug_assert!(buf.len() >= rows * cols);
    // SAFETY: per the caller.
    unsafe {
        gemm_serial(
            (rows, cols, d),
            (buf.as_mut_ptr(), cols as isize, 1),
            false,
            q.mat(bi, h, r0),
            k.mat_t(bi, g, 0),
            scale,
        );
    }
}

/// Causal attention of `q` `[B, H, T, d]` over `k`, `v` `[B, H_kv, T, d]`
/// (any strides). Returns the output as `[B·T, H·d]` rows and the rows'
/// log-sum-exp `[B, H, T]` (for [`causal_backward`]).
pub fn causal_forward(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let dm = Dims::of(q, k)?;
    let Dims { b, nh, nkv, t, d } = dm;
    let qv = View::of("q", q, [b as i64, nh as i64, t as i64, d as i64])?;
    let kv = View::of("k", k, dm.kv_shape())?;
    let vv = View::of("v", v, dm.kv_shape())?;
    let opts = (Kind::Float, Device::Cpu);
    let out = Tensor::empty([(b * t) as i64, (nh * d) as i64], opts);
    let lse = Tensor::empty([b as i64, nh as i64, t as i64], opts);
    let ov = View {
        ptr: out.data_ptr() as *mut f32,
        // Rows of the output as [B, H, T, d]: head h of token (b, t) is at
        // (b·T + t)·H·d + h·d.
        s: [(t * nh * d) as isize, d as isize, (nh * d) as isize, 1],
    };
    let lv = View {
        ptr: lse.data_ptr() as *mut f32,
        s: [(nh * t) as isize, t as isize, 1, 1],
    };
    let scale = 1.0 / (d as f32).sqrt();
    let rep = nh / nkv;
    let f = move |start: usize, end: usize| {
        let mut s = vec![0.0f32; BLOCK.min(t) * t];
        for unit in start..end {
            let (bi, h) = (unit / nh, unit % nh);
            let g = h / rep;
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(t);
                let (rows, cols) = (r1 - r0, r1);
                // SAFETY: r0 < r1 ≤ T rows of checked tensors; `s` is this
                // thread's and holds rows·cols floats.
                unsafe { scores(&mut s, (rows, cols, d), qv, kv, (bi, h, g, r0), scale) };
                for i in 0..rows {
                    let row = &mut s[i * cols..(i + 1) * cols];
                    let visible = r0 + i + 1;
                    let (live, masked) = row.split_at_mut(visible);
                    let (mut max, mut sum) = (0.0f32, 0.0f32);
                    kernels::row_max(live, &mut max);
                    kernels::row_exp_sum(live, max, &mut sum);
                    kernels::row_scale(live, 1.0 / sum);
                    masked.fill(0.0);
                    // SAFETY: (bi, h, r0 + i) is inside the lse tensor and
                    // belongs to this unit.
                    unsafe { *lv.at(bi, h, r0 + i) = max + sum.ln() };
                }
                // SAFETY: as above; the output rows of (bi, h) belong to
                // this unit alone.
                unsafe {
                    gemm_serial(
                        (rows, d, cols),
                        (ov.at(bi, h, r0), ov.s[2], 1),
                        false,
                        (s.as_ptr(), cols as isize, 1),
                        vv.mat(bi, g, 0),
                        1.0,
                    );
                }
            }
        }
    };
    kernels::parallel_rows(b * nh, t * t * d / 2, &f);
    Ok((out, lse))
}

/// Gradients of [`causal_forward`] for the output gradient `d_out` (`[B·T,
/// H·d]` rows), given the forward's inputs, output rows and log-sum-exp.
/// Returns `(dq, dk, dv)` as `[B·T, H·d]`, `[B·T, H_kv·d]` and `[B·T, H_kv·d]`
/// rows.
pub fn causal_backward(
    d_out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dm = Dims::of(q, k)?;
    let Dims { b, nh, nkv, t, d } = dm;
    let qv = View::of("q", q, [b as i64, nh as i64, t as i64, d as i64])?;
    let kv = View::of("k", k, dm.kv_shape())?;
    let vv = View::of("v", v, dm.kv_shape())?;
    let rows_shape = [b as i64, t as i64, nh as i64, d as i64];
    let as_rows = |name: &str, x: &Tensor| -> Result<View> {
        if !x.is_contiguous() {
            return Err(EngineError::invalid(
                name,
                "attention rows must be contiguous",
            ));
        }
        let r = View::of(name, &x.view(rows_shape), rows_shape)?;
        Ok(View {
            ptr: r.ptr,
            s: [r.s[0], r.s[2], r.s[1], r.s[3]],
        })
    };
    let dov = as_rows("d_out", d_out)?;
    let ov = as_rows("out", out)?;
    let lv = View::of("lse", &lse.unsqueeze(3), [b as i64, nh as i64, t as i64, 1])?;
    let opts = (Kind::Float, Device::Cpu);
    let dq = Tensor::empty([(b * t) as i64, (nh * d) as i64], opts);
    let dk = Tensor::zeros([(b * t) as i64, (nkv * d) as i64], opts);
    let dv = Tensor::zeros([(b * t) as i64, (nkv * d) as i64], opts);
    let rows_of = |x: &Tensor, heads: usize| View {
        ptr: x.data_ptr() as *mut f32,
        s: [
            (t * heads * d) as isize,
            d as isize,
            (heads * d) as isize,
            1,
        ],
    };
    let (dqv, dkv, dvv) = (rows_of(&dq, nh), rows_of(&dk, nkv), rows_of(&dv, nkv));
    let scale = 1.0 / (d as f32).sqrt();
    let rep = nh / nkv;
    let f = move |start: usize, end: usize| {
        let width = BLOCK.min(t) * t;
        let (mut p, mut dp) = (vec![0.0f32; width], vec![0.0f32; width]);
        for unit in start..end {
            let (bi, g) = (unit / nkv, unit % nkv);
            for h in g * rep..(g + 1) * rep {
                for r0 in (0..t).step_by(BLOCK) {
                    let r1 = (r0 + BLOCK).min(t);
                    let (rows, cols) = (r1 - r0, r1);
                    let ld = cols as isize;
                    let d_o = (dov.at(bi, h, r0) as *const f32, dov.s[2], 1);
                    // SAFETY (all GEMMs below): the pointers address rows of
                    // their checked tensors; `p`, `dp` are this thread's; dq's
                    // rows of (bi, h) and dk/dv's slices of (bi, g) belong to
                    // this unit alone.
                    // P = exp(scale·Q Kᵀ − lse), zero above the diagonal.
                    unsafe { scores(&mut p, (rows, cols, d), qv, kv, (bi, h, g, r0), scale) };
                    for i in 0..rows {
                        let row = &mut p[i * cols..(i + 1) * cols];
                        let (live, masked) = row.split_at_mut(r0 + i + 1);
                        // SAFETY: inside the lse tensor.
                        let l = unsafe { *lv.at(bi, h, r0 + i) };
                        let mut unused = 0.0;
                        kernels::row_exp_sum(live, l, &mut unused);
                        masked.fill(0.0);
                    }
                    unsafe {
                        // dV += Pᵀ dO.
                        gemm_serial(
                            (cols, d, rows),
                            (dvv.at(bi, g, 0), dvv.s[2], 1),
                            true,
                            (p.as_ptr(), 1, ld),
                            d_o,
                            1.0,
                        );
                        // dP = dO Vᵀ.
                        gemm_serial(
                            (rows, cols, d),
                            (dp.as_mut_ptr(), ld, 1),
                            false,
                            d_o,
                            vv.mat_t(bi, g, 0),
                            1.0,
                        );
                    }
                    for i in 0..rows {
                        // Σ_j P·dP = dO·O of this row.
                        let mut dot = 0.0f32;
                        for c in 0..d {
                            // SAFETY: inside the d_out and out rows.
                            unsafe {
                                dot += *dov.at(bi, h, r0 + i).add(c) * *ov.at(bi, h, r0 + i).add(c);
                            }
                        }
                        let span = i * cols..(i + 1) * cols;
                        kernels::softmax_grad_row(&p[span.clone()], &mut dp[span], dot);
                    }
                    unsafe {
                        // dQ = scale · dS K.
                        gemm_serial(
                            (rows, d, cols),
                            (dqv.at(bi, h, r0), dqv.s[2], 1),
                            false,
                            (dp.as_ptr(), ld, 1),
                            kv.mat(bi, g, 0),
                            scale,
                        );
                        // dK += scale · dSᵀ Q.
                        gemm_serial(
                            (cols, d, rows),
                            (dkv.at(bi, g, 0), dkv.s[2], 1),
                            true,
                            (dp.as_ptr(), 1, ld),
                            qv.mat(bi, h, r0),
                            scale,
                        );
                    }
                }
            }
        }
    };
    kernels::parallel_rows(b * nkv, rep * t * t * d, &f);
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forward and all three gradients against libtorch's attention (math
    /// path, f64) with autograd, for GQA and plain heads, a length that is
    /// not a multiple of the block, and strided (transposed) inputs.
    #[test]
    fn forward_and_gradients_match_libtorch() {
        tch::manual_seed(11);
        for &(b, nh, nkv, t, d) in &[(2, 4, 2, 100, 16), (1, 3, 3, 130, 32), (2, 2, 1, 7, 8)] {
            let f = (Kind::Float, Device::Cpu);
            // Projection-shaped rows viewed as [B, H, T, d], as the model does.
            let q = Tensor::randn([b, t, nh, d], f).transpose(1, 2);
            let k = Tensor::randn([b, t, nkv, d], f).transpose(1, 2);
            let v = Tensor::randn([b, t, nkv, d], f).transpose(1, 2);
            let (out, lse) = causal_forward(&q, &k, &v).unwrap();
            let d_out = Tensor::randn([b * t, nh * d], f);
            let (dq, dk, dv) = causal_backward(&d_out, &q, &k, &v, &out, &lse).unwrap();

            let leaf = |x: &Tensor| x.to_kind(Kind::Double).detach().set_requires_grad(true);
            let (q64, k64, v64) = (leaf(&q), leaf(&k), leaf(&v));
            let rep = nh / nkv;
            let want = Tensor::scaled_dot_product_attention::<Tensor>(
                &q64,
                &k64.repeat_interleave_self_int(rep, Some(1), None),
                &v64.repeat_interleave_self_int(rep, Some(1), None),
                None,
                0.0,
                true,
                None,
                false,
            );
            let want_rows = want.transpose(1, 2).reshape([b * t, nh * d]);
            let close = |name: &str, got: &Tensor, want: &Tensor| {
                let err = (got.to_kind(Kind::Double) - want)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(
                    err < 1e-4,
                    "{name} (b={b} nh={nh} nkv={nkv} t={t} d={d}): {err}"
                );
            };
            close("out", &out, &want_rows);
            (&want_rows * d_out.to_kind(Kind::Double))
                .sum(Kind::Double)
                .backward();
            let rows = |g: Tensor, heads: i64| g.transpose(1, 2).reshape([b * t, heads * d]);
            close("dq", &dq, &rows(q64.grad(), nh));
            close("dk", &dk, &rows(k64.grad(), nkv));
            close("dv", &dv, &rows(v64.grad(), nkv));
            // The log-sum-exp of each row of scale·QKᵀ over its visible keys.
            let s = q64.detach().matmul(
                &k64.detach()
                    .repeat_interleave_self_int(rep, Some(1), None)
                    .transpose(2, 3),
            ) / (d as f64).sqrt();
            let mask = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
            let want_lse = s
                .masked_fill(&mask, f64::NEG_INFINITY)
                .logsumexp([-1], false);
            close("lse", &lse, &want_lse);
        }
    }

    #[test]
    fn mismatched_heads_are_errors() {
        let f = (Kind::Float, Device::Cpu);
        let q = Tensor::randn([1, 3, 4, 8], f);
        let k = Tensor::randn([1, 2, 4, 8], f);
        let e = causal_forward(&q, &k, &k).err().unwrap().to_string();
        assert!(e.contains("multiple of"), "{e}");
    }
}

//! A LoRA training pass with a hand-written backward: forward and backward of
//! the decoder layers in libtorch kernels, without autograd.
//!
//! Autograd builds the same gradients from ~40 recorded operations per layer,
//! each multi-consumer activation summing its gradients in separate passes.
//! Here every input gradient is accumulated in the GEMM that produces it
//! (`addmm_`, β = 1): the frozen projection's input gradient, the adapter's
//! and the gradients of the sibling projections that read the same input
//! (q/k/v, gate/up) land in one buffer; RMSNorm's backward is five passes;
//! RoPE's backward writes the query/key gradients straight into the
//! row-major layout the projections read; the adapters' gradients are added
//! to the leaves' `.grad` buffers in place. Base weights never get a gradient
//! and the first layer's input gradient is not computed.
//!
//! Invariant: the same mathematics as [`LlamaModel::forward_hidden_t`] with
//! autograd (`y = base(x) + scale·B(A(x))`, PEFT's semantics); the tests
//! compare adapter gradients with autograd's on the llama, mistral and qwen2
//! fixtures, and the adapter-dropout path against autograd with the same
//! masks. [`LlamaModel::fused_training_supported`] says when it applies:
//! CPU, fp32, plain causal attention within any sliding window. Anything
//! else (packed rows, bf16, CUDA, activation checkpointing) takes the
//! autograd path.

use crate::attention;
use crate::error::{EngineError, Result};
use crate::kernels;
use crate::lora::LoraLayer;
use crate::matmul;
use crate::model::LlamaModel;
use crate::nn::Linear;
use tch::{Device, Kind, Tensor};

/// What the forward keeps for the backward of projections that read the
/// same input (q/k/v, gate/up, or one alone): the adapters' down-projections
/// of all of them in one `[N, Σr]` tensor, made by one GEMM with the scaled
/// `A`s stacked (`[Σr, in]`).
struct SavedGroup {
    /// `scale · x Aᵀ` of each member with an adapter, side by side.
    downs: Option<Tensor>,
    /// `scale · A` of each member with an adapter, stacked.
    scaled_a: Option<Tensor>,
    /// Column offset and rank of each member's adapter in `downs`.
    slots: Vec<Option<(i64, i64)>>,
    /// With adapter dropout, each member's dropout multiplier (`mask / (1 −
    /// p)`, `[N, in]`) by which its down-projection's input was scaled; the
    /// members' down-projections are then separate GEMMs.
    masks: Option<Vec<Option<Tensor>>>,
}

/// Saved activations of one decoder layer (rows are the `N = B·T` tokens).
struct SavedLayer {
    xn1: Tensor,
    r1: Tensor,
    h1: Tensor,
    lqkv: SavedGroup,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn: Tensor,
    lo: SavedGroup,
    xn2: Tensor,
    r2: Tensor,
    h2: Tensor,
    lgu: SavedGroup,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    ld: SavedGroup,
}

/// The forward's record for [`LlamaModel::fused_backward`].
pub struct FusedTape {
    b: i64,
    t: i64,
    cos: Tensor,
    sin: Tensor,
    layers: Vec<SavedLayer>,
    xn_final: Tensor,
    r_final: Tensor,
}

impl std::fmt::Debug for FusedTape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedTape")
            .field("batch", &self.b)
            .field("seq", &self.t)
            .field("layers", &self.layers.len())
            .finish()
    }
}

/// `x Wᵀ (+ b) + scale · B(A(x))` of each projection in `lins` (all reading
/// rows `x` `[N, in]`). The adapters' down-projections are one GEMM; each
/// up-projection is added to its output by `addmm_`.
fn group_forward(lins: &[&Linear], x: &Tensor, train: bool) -> Result<(Vec<Tensor>, SavedGroup)> {
    let mut outs: Vec<Tensor> = lins
        .iter()
        .map(|lin| match &lin.bias {
            Some(b) => matmul::addmm(b, x, &lin.weight.tr()),
            None => matmul::mm(x, &lin.weight.tr()),
        })
        .collect::<Result<_>>()?;
    let mut slots = Vec::with_capacity(lins.len());
    let mut scaled = Vec::new();
    let mut off = 0;
    for lin in lins {
        match active(lin) {
            Some(l) => {
                let r = l.rank();
                slots.push(Some((off, r)));
                off += r;
                scaled.push(&l.a * l.scale);
            }
            None => slots.push(None),
        }
    }
    if scaled.is_empty() {
        return Ok((
            outs,
            SavedGroup {
                downs: None,
                scaled_a: None,
                slots,
                masks: None,
            },
        ));
    }
    let scaled_a = Tensor::cat(&scaled, 0);
    let dropping = |l: &LoraLayer| train && l.dropout > 0.0;
    let (downs, masks) = if lins.iter().any(|lin| active(lin).is_some_and(dropping)) {
        // Each member drops its own input (PEFT: one dropout module per
        // adapter), drawn in member order as the autograd forward draws them.
        let downs = Tensor::empty([x.size()[0], off], (x.kind(), x.device()));
        let mut masks = Vec::with_capacity(lins.len());
        for (lin, slot) in lins.iter().zip(&slots) {
            let (Some(l), Some((o, r))) = (active(lin), slot) else {
                masks.push(None);
                continue;
            };
            let a = scaled_a.narrow(0, *o, *r);
            let out = downs.narrow(1, *o, *r);
            if dropping(l) {
                let m = x.ones_like().dropout(l.dropout, true);
                matmul::mm_into(&out, &(x * &m), &a.tr(), false)?;
                masks.push(Some(m));
            } else {
                matmul::mm_into(&out, x, &a.tr(), false)?;
                masks.push(None);
            }
        }
        (downs, Some(masks))
    } else {
        (matmul::mm(x, &scaled_a.tr())?, None)
    };
    for ((lin, out), slot) in lins.iter().zip(&mut outs).zip(&slots) {
        if let (Some(l), Some((o, r))) = (active(lin), slot) {
            matmul::mm_into(out, &downs.narrow(1, *o, *r), &l.b.tr(), true)?;
        }
    }
    Ok((
        outs,
        SavedGroup {
            downs: Some(downs),
            scaled_a: Some(scaled_a),
            slots,
            masks,
        },
    ))
}

/// The one output of a one-member group.
fn single(mut outs: Vec<Tensor>) -> Tensor {
    outs.pop().expect("one projection")
}

/// The enabled adapter of a projection.
fn active(lin: &Linear) -> Option<&LoraLayer> {
    lin.lora.as_ref().filter(|l| l.enabled)
}

/// Adds `g` to a leaf's gradient: in its buffer when it has one, else kept
/// for [`Grads::finish`].
struct Grads {
    pending: Vec<(Tensor, Tensor)>,
}

impl Grads {
    /// `∂/∂leaf += g`.
    fn add(&mut self, leaf: &Tensor, g: Tensor) {
        let mut buf = leaf.grad();
        if buf.defined() {
            let _ = buf.g_add_(&g);
        } else {
            self.pending.push((leaf.shallow_clone(), g));
        }
    }

    /// Hands gradients of leaves that had no buffer yet to autograd (once per
    /// leaf's lifetime: later steps accumulate in place).
    fn finish(self) {
        if self.pending.is_empty() {
            return;
        }
        let mut total: Option<Tensor> = None;
        for (leaf, g) in &self.pending {
            let s = (leaf * g).sum(leaf.kind());
            total = Some(match total {
                Some(t) => t + s,
                None => s,
            });
        }
        if let Some(t) = total {
            t.backward();
        }
    }
}

/// Backward through a group made by [`group_forward`] for the output
/// gradients `dys` (one per member): the adapters' gradients into their
/// leaves and, when `need_input`, the input gradient
/// `Σ dyᵢ Wᵢ + Σ scaleᵢ · (dyᵢ Bᵢ) Aᵢ`, every term accumulated by a GEMM with
/// β = 1 (the adapters' share in one GEMM).
fn group_backward(
    lins: &[&Linear],
    saved: &SavedGroup,
    x: &Tensor,
    dys: &[&Tensor],
    need_input: bool,
    grads: &mut Grads,
) -> Result<Option<Tensor>> {
    let mut dx: Option<Tensor> = None;
    if need_input {
        for (lin, dy) in lins.iter().zip(dys) {
            dx = Some(match dx {
                Some(acc) => {
                    matmul::mm_into(&acc, dy, &lin.weight, true)?;
                    acc
                }
                None => matmul::mm(dy, &lin.weight)?,
            });
        }
    }
    if let (Some(downs), Some(scaled_a)) = (&saved.downs, &saved.scaled_a) {
        // d(downs): dyᵢ Bᵢ side by side, written in place by each GEMM.
        let d_downs = downs.empty_like();
        for ((lin, dy), slot) in lins.iter().zip(dys).zip(&saved.slots) {
            if let (Some(l), Some((o, r))) = (active(lin), slot) {
                // out += downᵢ Bᵢᵀ: ∂Bᵢ = dyᵢᵀ downᵢ, made as its transpose
                // (a [r, out] result: several times faster in MKL than the
                // thin [out, r] one).
                let d_bt = matmul::mm(&downs.narrow(1, *o, *r).tr(), dy)?;
                grads.add(&l.b, d_bt.tr());
                matmul::mm_into(&d_downs.narrow(1, *o, *r), dy, &l.b, false)?;
            }
        }
        match &saved.masks {
            None => {
                // downs = x (scale·A)ᵀ: ∂Aᵢ = scaleᵢ · d(downᵢ)ᵀ x.
                let d_a = matmul::mm(&d_downs.tr(), x)?;
                for (lin, slot) in lins.iter().zip(&saved.slots) {
                    if let (Some(l), Some((o, r))) = (active(lin), slot) {
                        grads.add(&l.a, d_a.narrow(0, *o, *r) * l.scale);
                    }
                }
                if let Some(acc) = &dx {
                    matmul::mm_into(acc, &d_downs, scaled_a, true)?;
                }
            }
            Some(masks) => {
                // downᵢ = (x ⊙ mᵢ)(scale·Aᵢ)ᵀ: ∂Aᵢ = scaleᵢ · d(downᵢ)ᵀ (x ⊙ mᵢ)
                // and the input gradient passes back through the mask.
                for ((lin, slot), mask) in lins.iter().zip(&saved.slots).zip(masks) {
                    let (Some(l), Some((o, r))) = (active(lin), slot) else {
                        continue;
                    };
                    let d_down = d_downs.narrow(1, *o, *r);
                    let a = scaled_a.narrow(0, *o, *r);
                    let input = match mask {
                        Some(m) => x * m,
                        None => x.shallow_clone(),
                    };
                    grads.add(&l.a, matmul::mm(&d_down.tr(), &input)? * l.scale);
                    if let Some(acc) = dx.as_mut() {
                        match mask {
                            Some(m) => {
                                let _ = acc.addcmul_(&matmul::mm(&d_down, &a)?, m);
                            }
                            None => matmul::mm_into(acc, &d_down, &a, true)?,
                        }
                    }
                }
            }
        }
    }
    Ok(dx)
}

/// The error for a [`group_backward`] asked for its input gradient that
/// returned none (it always makes one when asked).
fn missing_input_gradient() -> EngineError {
    EngineError::invalid("model", "the fused backward made no input gradient")
}

/// Rotary embedding of `x` `[B, T, heads, d]` (a view of the projection's
/// rows) into a new `[B, heads, T, d]` tensor: `x·cos + rotate(x)·sin`, the
/// sign of `rotate_half` folded into `sin` (`[B, 1, T, d]`).
fn rope_forward(x: &Tensor, cos: &Tensor, sin: &Tensor, d: i64) -> Tensor {
    let x = x.transpose(1, 2);
    let half = d / 2;
    let out = &x * cos;
    let (lo, hi) = (x.narrow(-1, 0, half), x.narrow(-1, half, half));
    let _ = out
        .narrow(-1, 0, half)
        .addcmul_(&hi, &sin.narrow(-1, 0, half));
    let _ = out
        .narrow(-1, half, half)
        .addcmul_(&lo, &sin.narrow(-1, half, half));
    out
}

/// Backward of [`rope_forward`]: the gradient `g` `[B, heads, T, d]` mapped
/// back through the rotation into `rows` (`[N, heads·d]`, row-major, written
/// whole).
fn rope_backward_into(
    rows: &Tensor,
    g: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    b: i64,
    t: i64,
    d: i64,
) {
    let heads = g.size()[1];
    let view = rows.view([b, t, heads, d]).transpose(1, 2);
    let half = d / 2;
    let _ = g.mul_out(&view, cos);
    // out_lo = x_lo·cos_lo + x_hi·sin_lo, out_hi = x_hi·cos_hi + x_lo·sin_hi.
    let _ = view
        .narrow(-1, half, half)
        .addcmul_(&g.narrow(-1, 0, half), &sin.narrow(-1, 0, half));
    let _ = view
        .narrow(-1, 0, half)
        .addcmul_(&g.narrow(-1, half, half), &sin.narrow(-1, half, half));
}

impl LlamaModel {
    /// Whether [`Self::fused_forward`] can train this model on a batch of
    /// `t` positions: CPU, fp32 weights and adapters, no adapter on
    /// `lm_head` (the pass ends at the final norm), and causal attention that
    /// no sliding window narrows.
    pub fn fused_training_supported(&self, t: i64) -> bool {
        if self.device() != Device::Cpu || self.kind() != Kind::Float {
            return false;
        }
        if active(&self.lm_head).is_some() {
            return false;
        }
        if self.config.sliding_window.is_some_and(|w| t > w as i64) {
            return false;
        }
        self.linears().iter().all(|(_, lin)| match &lin.lora {
            Some(l) => l.a.kind() == self.kind(),
            None => true,
        })
    }

    /// The final hidden states `[B, T, H]` (after the last norm) of a causal
    /// pass over `input_ids` at `position_ids`, detached, and the tape for
    /// [`Self::fused_backward`]. `train` applies the adapters' dropout, with
    /// the masks drawn from libtorch's generator in the order the autograd
    /// forward draws them (so a seeded pass draws the same masks). Errors when
    /// [`Self::fused_training_supported`] is false.
    pub fn fused_forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        train: bool,
    ) -> Result<(Tensor, FusedTape)> {
        let size = input_ids.size();
        let (b, t) = match size[..] {
            [b, t] if t > 0 => (b, t),
            _ => {
                return Err(EngineError::invalid(
                    "input_ids",
                    format!("expected a non-empty [batch, seq] tensor, got {size:?}"),
                ));
            }
        };
        if !self.fused_training_supported(t) {
            return Err(EngineError::invalid(
                "model",
                "the fused training pass needs an fp32 CPU model with no adapter on lm_head and \
                 plain causal attention within any sliding window; use the autograd forward",
            ));
        }
        tch::no_grad(|| {
            let c = &self.config;
            let (nh, nkv, d) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
            let h = c.hidden_size as i64;
            let n = b * t;
            let positions = position_ids.to_kind(Kind::Int64).expand([b, t], false);
            let (cos, sin) = self.rope_tables(&positions);
            let mut x = self.embed(input_ids).reshape([n, h]);
            let mut layers = Vec::with_capacity(self.layers.len());
            let native_attention = matmul::backend() == matmul::Backend::Native;
            for layer in &self.layers {
                let at = &layer.self_attn;
                let n1 = &layer.input_layernorm;
                let (xn1, r1, h1) = kernels::rms_norm_forward(&x, &n1.weight, n1.eps)?;
                let (qkv, lqkv) = group_forward(&[&at.q_proj, &at.k_proj, &at.v_proj], &h1, train)?;
                let [q, k, v]: [Tensor; 3] = qkv.try_into().expect("three projections");
                let q = rope_forward(&q.view([b, t, nh, d]), &cos, &sin, d);
                let k = rope_forward(&k.view([b, t, nkv, d]), &cos, &sin, d);
                let v = v.view([b, t, nkv, d]).transpose(1, 2);
                let (out, lse, attn) = if native_attention {
                    // The output rows are the attention's own layout.
                    let (rows, lse) = attention::causal_forward(&q, &k, &v)?;
                    (rows.shallow_clone(), lse, rows)
                } else {
                    let (out, lse) = Tensor::internal_scaled_dot_product_flash_attention_for_cpu::<
                        Tensor,
                    >(&q, &k, &v, 0.0, true, None, None);
                    let attn = out.transpose(1, 2).reshape([n, nh * d]);
                    (out, lse, attn)
                };
                let (o, lo) = group_forward(&[&at.o_proj], &attn, train)?;
                let mut o = single(o);
                let _ = o.g_add_(&x);
                let x2 = o;
                let n2 = &layer.post_attention_layernorm;
                let (xn2, r2, h2) = kernels::rms_norm_forward(&x2, &n2.weight, n2.eps)?;
                let m = &layer.mlp;
                let (gu, lgu) = group_forward(&[&m.gate_proj, &m.up_proj], &h2, train)?;
                let [gate, up]: [Tensor; 2] = gu.try_into().expect("two projections");
                let act = kernels::swiglu_forward(&gate, &up)?;
                let (y, ld) = group_forward(&[&m.down_proj], &act, train)?;
                let mut y = single(y);
                let _ = y.g_add_(&x2);
                x = y;
                layers.push(SavedLayer {
                    xn1,
                    r1,
                    h1,
                    lqkv,
                    q,
                    k,
                    v,
                    out,
                    lse,
                    attn,
                    lo,
                    xn2,
                    r2,
                    h2,
                    lgu,
                    gate,
                    up,
                    act,
                    ld,
                });
            }
            let (xn_final, r_final, hidden) =
                kernels::rms_norm_forward(&x, &self.norm.weight, self.norm.eps)?;
            let hidden = hidden.view([b, t, h]);
            Ok((
                hidden,
                FusedTape {
                    b,
                    t,
                    cos,
                    sin,
                    layers,
                    xn_final,
                    r_final,
                },
            ))
        })
    }

    /// Back-propagates `d_hidden` (`[B, T, H]`, the loss's gradient with
    /// respect to [`Self::fused_forward`]'s output) through the decoder,
    /// adding every adapter's gradient to its leaves' `.grad`.
    pub fn fused_backward(&self, tape: FusedTape, d_hidden: &Tensor) -> Result<()> {
        let FusedTape {
            b,
            t,
            cos,
            sin,
            layers,
            xn_final,
            r_final,
        } = tape;
        let c = &self.config;
        let (nh, nkv, d) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
        let h = c.hidden_size as i64;
        let n = b * t;
        let native_attention = matmul::backend() == matmul::Backend::Native;
        let grads = tch::no_grad(|| {
            let mut grads = Grads {
                pending: Vec::new(),
            };
            let dh = d_hidden.reshape([n, h]);
            let mut dy =
                kernels::rms_norm_backward(None, &dh, &self.norm.weight, &xn_final, &r_final)?;
            for (l, (layer, s)) in self.layers.iter().zip(layers).enumerate().rev() {
                let m = &layer.mlp;
                // down_proj: d(act).
                let d_act =
                    group_backward(&[&m.down_proj], &s.ld, &s.act, &[&dy], true, &mut grads)?
                        .ok_or_else(missing_input_gradient)?;
                // SwiGLU: act = silu(gate) · up.
                let (d_gate, d_up) = kernels::swiglu_backward(&d_act, &s.gate, &s.up)?;
                drop(d_act);
                let dh2 = group_backward(
                    &[&m.gate_proj, &m.up_proj],
                    &s.lgu,
                    &s.h2,
                    &[&d_gate, &d_up],
                    true,
                    &mut grads,
                )?
                .ok_or_else(missing_input_gradient)?;
                drop((d_gate, d_up));
                let dx2 = kernels::rms_norm_backward(
                    Some(&dy),
                    &dh2,
                    &layer.post_attention_layernorm.weight,
                    &s.xn2,
                    &s.r2,
                )?;
                drop(dh2);
                // o_proj.
                let at = &layer.self_attn;
                let d_attn =
                    group_backward(&[&at.o_proj], &s.lo, &s.attn, &[&dx2], true, &mut grads)?
                        .ok_or_else(missing_input_gradient)?;
                let (dq, dk, dv_rows) = if native_attention {
                    let (dq, dk, dv) =
                        attention::causal_backward(&d_attn, &s.q, &s.k, &s.v, &s.attn, &s.lse)?;
                    (
                        dq.view([b, t, nh, d]).transpose(1, 2),
                        dk.view([b, t, nkv, d]).transpose(1, 2),
                        dv,
                    )
                } else {
                    let d_out = d_attn.view([b, t, nh, d]).transpose(1, 2);
                    let (dq, dk, dv) =
                        Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward::<
                            Tensor,
                        >(
                            &d_out, &s.q, &s.k, &s.v, &s.out, &s.lse, 0.0, true, None, None,
                        );
                    (dq, dk, dv.transpose(1, 2).reshape([n, nkv * d]))
                };
                drop(d_attn);
                let dq_rows = Tensor::empty([n, nh * d], (dq.kind(), dq.device()));
                rope_backward_into(&dq_rows, &dq, &cos, &sin, b, t, d);
                let dk_rows = Tensor::empty([n, nkv * d], (dk.kind(), dk.device()));
                rope_backward_into(&dk_rows, &dk, &cos, &sin, b, t, d);
                drop((dq, dk));
                // The first layer's input is the frozen embedding: only the
                // adapters' gradients are needed there.
                let dh1 = group_backward(
                    &[&at.q_proj, &at.k_proj, &at.v_proj],
                    &s.lqkv,
                    &s.h1,
                    &[&dq_rows, &dk_rows, &dv_rows],
                    l > 0,
                    &mut grads,
                )?;
                if let Some(dh1) = dh1 {
                    dy = kernels::rms_norm_backward(
                        Some(&dx2),
                        &dh1,
                        &layer.input_layernorm.weight,
                        &s.xn1,
                        &s.r1,
                    )?;
                }
            }
            Ok::<_, EngineError>(grads)
        })?;
        // Outside no_grad: the first gradients go through autograd.
        grads.finish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LoraSpec, adapter_tensors, attach};
    use crate::testutil::{attach_live_lora, max_abs_diff, tiny_models};

    /// A fixture with adapters on every projection whose `B` is non-zero
    /// (so every adapter gradient is).
    fn model(arch: &str) -> LlamaModel {
        let mut m = LlamaModel::load(&tiny_models().join(arch), Kind::Float, Device::Cpu)
            .unwrap()
            .0;
        attach_live_lora(&mut m);
        m
    }

    fn grads(m: &LlamaModel) -> Vec<(String, Tensor)> {
        adapter_tensors(m)
            .into_iter()
            .map(|(k, t)| (k, t.grad().copy()))
            .collect()
    }

    fn zero_grads(m: &LlamaModel) {
        tch::no_grad(|| {
            for (_, t) in adapter_tensors(m) {
                let _ = t.grad().zero_();
            }
        });
    }

    /// Largest gradient difference relative to the largest gradient.
    fn rel_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
        let scale = a
            .iter()
            .map(|(_, t)| f64::try_from(t.abs().max()).unwrap())
            .fold(0.0, f64::max);
        assert!(scale > 0.0);
        a.iter()
            .zip(b)
            .map(|((ka, ta), (kb, tb))| {
                assert_eq!(ka, kb);
                max_abs_diff(ta, tb)
            })
            .fold(0.0, f64::max)
            / scale
    }

    /// Hidden states and adapter gradients of `Σ hidden ⊙ g` by the fused
    /// pass (first with no gradient buffers, then accumulating into them)
    /// and by autograd.
    fn check(arch: &str, t: i64) {
        let kind = Kind::Float;
        let m = model(arch);
        let h = m.config.hidden_size as i64;
        let ids = Tensor::from_slice(&(0..2 * t).map(|i| (i * 37 + 5) % 200).collect::<Vec<i64>>())
            .view([2, t]);
        let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .expand([2, t], false);
        let g = Tensor::randn([2, t, h], (kind, Device::Cpu));
        assert!(m.fused_training_supported(t));

        let (fused_hidden, tape) = m.fused_forward(&ids, &pos, true).unwrap();
        m.fused_backward(tape, &g).unwrap();
        let first = grads(&m);
        zero_grads(&m);

        let hidden = m
            .forward_hidden_t(&ids, None, Some(&pos), None, true)
            .unwrap();
        let dh = max_abs_diff(&hidden, &fused_hidden);
        let backend = matmul::backend();
        assert!(
            dh < 1e-5,
            "{arch} {t} {backend:?}: hidden states differ by {dh}"
        );
        (&hidden * &g).sum(kind).backward();
        let reference = grads(&m);
        zero_grads(&m);

        let (_, tape) = m.fused_forward(&ids, &pos, true).unwrap();
        m.fused_backward(tape, &g).unwrap();
        let again = grads(&m);
        for (what, ours) in [("fresh", &first), ("accumulated", &again)] {
            let d = rel_diff(&reference, ours);
            assert!(
                d < 1e-5,
                "{arch} {t} {backend:?} ({what} buffers): gradients differ by {d} (relative)"
            );
        }
    }

    #[test]
    fn gradients_equal_autograd_on_every_architecture() {
        // llama: plain; mistral: sliding window 6, 6 positions; qwen2: q/k/v
        // biases and grouped-query attention.
        // Both GEMM and attention backends, whichever the CPU would pick; 70
        // positions take two attention blocks.
        for backend in [matmul::Backend::Native, matmul::Backend::Libtorch] {
            for (arch, t) in [("llama", 9), ("llama", 70), ("mistral", 6), ("qwen2", 9)] {
                matmul::with_backend(backend, || check(arch, t));
            }
        }
    }

    #[test]
    fn unsupported_cases_are_refused() {
        // mistral's window (6) would narrow a 7-token causal pattern.
        let m = model("mistral");
        assert!(m.fused_training_supported(6));
        assert!(!m.fused_training_supported(7));
        let ids = Tensor::zeros([1, 7], (Kind::Int64, Device::Cpu));
        let pos = Tensor::arange(7, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let e = m.fused_forward(&ids, &pos, true).unwrap_err().to_string();
        assert!(e.contains("sliding window"), "{e}");
        // fp64 weights.
        let m = LlamaModel::load(&tiny_models().join("llama"), Kind::Double, Device::Cpu)
            .unwrap()
            .0;
        assert!(!m.fused_training_supported(4));
        // An adapter on lm_head, which the pass (ending at the final norm)
        // would not train.
        let mut m = model("llama");
        assert!(m.fused_training_supported(4));
        attach(
            &mut m,
            &LoraSpec::new(4, 8.0, 0.0, false, &["lm_head".into()]),
        )
        .unwrap();
        assert!(!m.fused_training_supported(4));
    }

    /// A projection `[out, in]` with an adapter of rank 3 whose `B` is non-zero.
    fn projection(out: i64, inp: i64, dropout: f64, bias: bool) -> Linear {
        let opts = (Kind::Float, Device::Cpu);
        let mut lin = Linear::new(
            Tensor::randn([out, inp], opts),
            bias.then(|| Tensor::randn([out], opts)),
        );
        lin.lora = Some(LoraLayer::new(
            Tensor::randn([3, inp], opts).set_requires_grad(true),
            Tensor::randn([out, 3], opts).set_requires_grad(true),
            0.7,
            dropout,
        ));
        lin
    }

    #[test]
    fn adapter_dropout_gradients_equal_autograd_with_the_same_masks() {
        // Three projections reading one input (as q/k/v), one without
        // dropout among them: outputs, adapter gradients and the input
        // gradient against autograd over the masks the fused pass drew.
        let q = projection(6, 5, 0.3, true);
        let k = projection(4, 5, 0.0, false);
        let v = projection(4, 5, 0.5, false);
        let lins = [&q, &k, &v];
        let x = Tensor::randn([64, 5], (Kind::Float, Device::Cpu));
        let gs: Vec<Tensor> = [6, 4, 4]
            .iter()
            .map(|&o| Tensor::randn([64, o], (Kind::Float, Device::Cpu)))
            .collect();

        let (outs, saved) = tch::no_grad(|| group_forward(&lins, &x, true)).unwrap();
        let masks = saved.masks.as_ref().expect("dropout draws masks");
        assert!(masks[1].is_none());
        for (mask, p) in [(&masks[0], 0.3), (&masks[2], 0.5)] {
            let m = mask.as_ref().expect("a mask");
            // Entries are 0 or 1/(1-p), about p of them 0.
            let kept = m.ne(0.0);
            let wrong = m.masked_select(&kept) - 1.0 / (1.0 - p);
            assert!(f64::try_from(wrong.abs().max()).unwrap() < 1e-6);
            let zeros = 1.0 - f64::try_from(kept.to_kind(Kind::Double).mean(Kind::Double)).unwrap();
            assert!((zeros - p).abs() < 0.1, "dropped {zeros}, p = {p}");
        }
        let mut grads = Grads {
            pending: Vec::new(),
        };
        let dx = tch::no_grad(|| {
            group_backward(
                &lins,
                &saved,
                &x,
                &[&gs[0], &gs[1], &gs[2]],
                true,
                &mut grads,
            )
        })
        .unwrap()
        .expect("input gradient");
        grads.finish();
        let ours: Vec<Tensor> = lins
            .iter()
            .flat_map(|l| {
                let a = l.lora.as_ref().unwrap();
                [a.a.grad().copy(), a.b.grad().copy()]
            })
            .collect();
        for l in lins {
            let a = l.lora.as_ref().unwrap();
            let _ = a.a.grad().zero_();
            let _ = a.b.grad().zero_();
        }

        let xr = x.detach().set_requires_grad(true);
        let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for (((lin, mask), g), out) in lins.iter().zip(masks).zip(&gs).zip(&outs) {
            let a = lin.lora.as_ref().unwrap();
            let input = match mask {
                Some(m) => &xr * m,
                None => xr.shallow_clone(),
            };
            let y = xr.linear(&lin.weight, lin.bias.as_ref())
                + input
                    .linear::<Tensor>(&a.a, None)
                    .linear::<Tensor>(&a.b, None)
                    * a.scale;
            assert!(max_abs_diff(&y, out) < 1e-5);
            total += (y * g).sum(Kind::Float);
        }
        total.backward();
        assert!(max_abs_diff(&xr.grad(), &dx) < 1e-4);
        let reference = lins.iter().flat_map(|l| {
            let a = l.lora.as_ref().unwrap();
            [a.a.grad(), a.b.grad()]
        });
        for (r, o) in reference.zip(&ours) {
            let d = max_abs_diff(&r, o);
            assert!(
                d < 1e-4 * (1.0 + f64::try_from(r.abs().max()).unwrap()),
                "{d}"
            );
        }
    }
}

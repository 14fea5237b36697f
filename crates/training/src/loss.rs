//! Token cross-entropy over the vocabulary in chunks, with the gradient
//! computed in closed form.
//!
//! The output projection is frozen, so the logits are never kept for
//! autograd: for each chunk of (at most `chunk_rows`) target positions we form
//! the logits, their log-sum-exp, the loss and `∂loss/∂hidden =
//! (softmax − onehot) · W / norm`, then drop the chunk. The backward pass of
//! the rest of the network is then driven through a surrogate
//! `Σ hidden ⊙ grad` whose gradient with respect to `hidden` is exactly that.
//! Memory for the logits is `chunk_rows × vocab` instead of
//! `batch × seq × vocab` (several copies of it in an autograd cross-entropy),
//! and only positions with a target are projected at all (prompt tokens and
//! padding cost nothing).
//!
//! `norm` is the number of target tokens of the whole effective batch (all
//! micro-batches of one optimiser step), so accumulating micro-batch
//! gradients gives exactly the full-batch gradient (pain point 7).

use tch::{Kind, Tensor};

use crate::batch::IGNORE_INDEX;
use crate::error::{Result, TrainError};

/// Default elements per logits chunk (rows × vocab): 8 Mi floats = 32 MiB.
pub const DEFAULT_CHUNK_ELEMENTS: i64 = 8 << 20;

/// Loss statistics of one micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossStats {
    /// Sum of token losses (nats).
    pub loss_sum: f64,
    /// Number of target tokens.
    pub n_targets: i64,
    /// Targets whose arg-max prediction was right.
    pub n_correct: i64,
}

impl LossStats {
    /// Adds another micro-batch.
    pub fn add(&mut self, o: LossStats) {
        self.loss_sum += o.loss_sum;
        self.n_targets += o.n_targets;
        self.n_correct += o.n_correct;
    }

    /// Mean token loss (NaN without targets).
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.n_targets as f64
    }

    /// Token accuracy (NaN without targets).
    pub fn accuracy(&self) -> f64 {
        self.n_correct as f64 / self.n_targets as f64
    }
}

/// Cross-entropy of `hidden` (`[B, T, H]`, part of the autograd graph)
/// projected by the frozen `weight` (`[V, H]`) against `targets` (`[B, T]`,
/// [`IGNORE_INDEX`] for none). When `backward` is set, gradients of
/// `Σ token_loss / norm` are accumulated into the graph's leaves.
pub fn chunked_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    norm: f64,
    backward: bool,
    chunk_elements: i64,
) -> Result<LossStats> {
    let (stats, grad) = loss_and_grad(hidden, weight, targets, norm, backward, chunk_elements)?;
    if let Some(RowGrad { h, g, .. }) = grad {
        // Σ h ⊙ g has gradient g with respect to h.
        (&h * &g).sum(Kind::Float).backward();
    }
    Ok(stats)
}

/// [`chunked_cross_entropy`] for a pass that back-propagates by hand: the
/// statistics and `∂(Σ token_loss / norm)/∂hidden` (`hidden`'s shape, zero
/// at positions without a target; `None` when there is no target).
pub fn chunked_cross_entropy_grad(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    norm: f64,
    chunk_elements: i64,
) -> Result<(LossStats, Option<Tensor>)> {
    let (stats, grad) = loss_and_grad(hidden, weight, targets, norm, true, chunk_elements)?;
    let full = grad.map(|RowGrad { g, rows, .. }| match rows {
        None => g.view(hidden.size().as_slice()),
        Some(idx) => {
            let h_dim = hidden.size()[hidden.dim() - 1];
            g.new_zeros([targets.numel() as i64, h_dim], (g.kind(), g.device()))
                .index_copy(0, &idx, &g)
                .view(hidden.size().as_slice())
        }
    });
    Ok((stats, full))
}

/// The rows of `hidden` the loss read and their gradient.
struct RowGrad {
    /// `[n, H]`: every row of `hidden`, or the gathered rows with a target.
    h: Tensor,
    /// `∂(Σ token_loss / norm)/∂h`.
    g: Tensor,
    /// The gathered rows' positions in the flattened batch (`None`: all rows).
    rows: Option<Tensor>,
}

/// The loss statistics and, when `backward`, the rows of `hidden` the loss
/// read with their gradient.
fn loss_and_grad(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    norm: f64,
    backward: bool,
    chunk_elements: i64,
) -> Result<(LossStats, Option<RowGrad>)> {
    let h_dim = hidden.size()[hidden.dim() - 1];
    let vocab = weight.size()[0];
    let flat_t = targets.reshape([-1]);
    let valid = flat_t.ne(IGNORE_INDEX);
    let n = valid.sum(Kind::Int64).int64_value(&[]);
    if n == 0 {
        return Ok((LossStats::default(), None));
    }
    let flat_h = hidden.reshape([-1, h_dim]);
    let rows_total = flat_h.size()[0];
    // Mostly targets (plain language modelling, long completions): project
    // every row and zero the gradient of the few without a target, instead of
    // gathering the rows (a copy forward, a scatter backward). Otherwise
    // project only the rows with a target.
    let dense = 10 * n >= 9 * rows_total;
    let (h, t, keep, gathered) = if dense {
        (flat_h, flat_t.shallow_clone(), Some(valid), None)
    } else {
        let idx = valid.nonzero().squeeze_dim(1);
        (
            flat_h.index_select(0, &idx),
            flat_t.index_select(0, &idx),
            None,
            Some(idx),
        )
    };
    let n_rows = h.size()[0];
    let rows = (chunk_elements / vocab.max(1)).max(1);
    let mut stats = LossStats {
        n_targets: n,
        ..Default::default()
    };
    let mut grads = Vec::new();
    tch::no_grad(|| -> Result<()> {
        let hd = h.detach();
        let w = weight.detach();
        let mut start = 0;
        while start < n_rows {
            let len = rows.min(n_rows - start);
            let hc = hd.narrow(0, start, len);
            // Ignored rows take class 0 for the arithmetic; their loss,
            // accuracy and gradient are masked out below.
            let tc = t.narrow(0, start, len).clamp_min(0).unsqueeze(1);
            // lora_engine::matmul: the engine's GEMM for f32 CPU products on
            // AMD processors (MKL's AVX2 path is slow there), else libtorch's.
            let mut logits = lora_engine::matmul::mm(&hc, &w.tr())?;
            if logits.kind() != Kind::Float && logits.kind() != Kind::Double {
                logits = logits.to_kind(Kind::Float);
            }
            if logits.kind() == Kind::Float && logits.device() == tch::Device::Cpu {
                // One pass over each row in cache (lora_engine::kernels):
                // loss, accuracy and the scaled softmax − onehot in place.
                let tv = Vec::<i64>::try_from(t.narrow(0, start, len).contiguous())
                    .map_err(|e| TrainError::Engine(format!("targets: {e}")))?;
                let (loss, correct) = lora_engine::kernels::cross_entropy_rows(
                    &logits,
                    &tv,
                    backward.then_some((1.0 / norm) as f32),
                )?;
                stats.loss_sum += loss;
                stats.n_correct += correct;
                if backward {
                    grads.push(lora_engine::matmul::mm(&logits, &w)?.to_kind(hd.kind()));
                }
                start += len;
                continue;
            }
            // One max, one in-place exp(logits − max), one sum: the log-sum-
            // exp, the loss and (when backward) the softmax share the passes
            // over the [len, V] chunk. A target is "correct" when its logit
            // equals the row's maximum (argmax up to ties, without a slow
            // arg-reduction).
            let max = logits.amax([1], true);
            let picked = logits.gather(1, &tc, false);
            let _ = logits.g_sub_(&max);
            let _ = logits.exp_();
            let sum = logits.sum_dim_intlist(&[1i64][..], true, logits.kind());
            let lse = &max + sum.log();
            let row_loss = &lse - &picked;
            let correct = picked.ge_tensor(&max);
            let chunk_keep = keep.as_ref().map(|k| k.narrow(0, start, len).unsqueeze(1));
            match &chunk_keep {
                Some(k) => {
                    stats.loss_sum += row_loss
                        .masked_select(k)
                        .sum(Kind::Double)
                        .double_value(&[]);
                    stats.n_correct += correct.logical_and(k).sum(Kind::Int64).int64_value(&[]);
                }
                None => {
                    stats.loss_sum += row_loss.sum(Kind::Double).double_value(&[]);
                    stats.n_correct += correct.sum(Kind::Int64).int64_value(&[]);
                }
            }
            if backward {
                // softmax − onehot, back through W, scaled by 1/norm (rows
                // without a target: 0). The softmax stays in the logits'
                // buffer and the scale is applied to the [len, H] result.
                let (scale, minus) = match &chunk_keep {
                    Some(k) => {
                        let k = k.to_kind(sum.kind());
                        (sum.reciprocal() * &k, k.neg())
                    }
                    None => (sum.reciprocal(), sum.ones_like().neg()),
                };
                let _ = logits.g_mul_(&scale);
                let _ = logits.scatter_add_(1, &tc, &minus);
                let g = logits.to_kind(w.kind()).matmul(&w) / norm;
                grads.push(g.to_kind(hd.kind()));
            }
            start += len;
        }
        Ok(())
    })?;
    if backward {
        let g = match grads.len() {
            1 => grads.remove(0),
            _ => Tensor::cat(&grads, 0),
        };
        return Ok((
            stats,
            Some(RowGrad {
                h,
                g,
                rows: gathered,
            }),
        ));
    }
    Ok((stats, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Loss, gradient and accuracy against autograd's full-logits
    /// cross-entropy and an arg-max count, for `targets` over a `[2, 10]` batch.
    fn check_against_autograd(targets: &[i64], chunk_elements: i64) {
        tch::manual_seed(0);
        let opts = (Kind::Double, Device::Cpu);
        let x = Tensor::randn([2, 10, 8], opts).set_requires_grad(true);
        let proj = Tensor::randn([8, 8], opts).set_requires_grad(true);
        let w = Tensor::randn([11, 8], opts);
        let targets = Tensor::from_slice(targets).reshape([2, 10]);
        let flat_t = targets.reshape([-1]);
        // Reference: full logits and autograd, mean over targets.
        let hidden = x.matmul(&proj);
        let logits = hidden.matmul(&w.tr()).reshape([-1, 11]);
        let reference =
            logits.cross_entropy_loss::<Tensor>(&flat_t, None, tch::Reduction::Mean, -100, 0.0);
        let ref_grad = Tensor::run_backward(&[&reference], &[&proj], false, false).remove(0);
        let valid = flat_t.ne(IGNORE_INDEX);
        let n = valid.sum(Kind::Int64).int64_value(&[]);
        let ref_correct = logits
            .argmax(1, false)
            .eq_tensor(&flat_t)
            .logical_and(&valid)
            .sum(Kind::Int64)
            .int64_value(&[]);

        let hidden = x.matmul(&proj);
        let stats =
            chunked_cross_entropy(&hidden, &w, &targets, n as f64, true, chunk_elements).unwrap();
        assert_eq!(stats.n_targets, n);
        assert_eq!(stats.n_correct, ref_correct);
        assert!((stats.mean() - reference.double_value(&[])).abs() < 1e-12);
        let diff = (proj.grad() - ref_grad).abs().max().double_value(&[]);
        assert!(diff < 1e-12, "gradient differs by {diff}");
    }

    #[test]
    fn equals_autograd_when_few_rows_have_targets() {
        // 13 of 20 rows: only the rows with a target are projected. Tiny
        // chunks: 2 rows of 11 at a time.
        let t = [
            3, -100, 4, 10, 0, -100, -100, 7, 1, 2, 5, 5, -100, -100, 9, 8, -100, 6, 1, 0,
        ];
        check_against_autograd(&t, 22);
    }

    #[test]
    fn equals_autograd_when_most_rows_have_targets() {
        // 18 of 20 rows: every row is projected and the two without a target
        // are masked; chunks of 3 rows and one chunk holding everything.
        let t = [
            3, 1, 4, 10, 0, 9, 2, 7, 1, -100, 5, 5, 6, 3, 9, 8, 4, 6, 1, -100,
        ];
        check_against_autograd(&t, 33);
        check_against_autograd(&t, 1 << 20);
    }

    #[test]
    fn the_returned_gradient_equals_the_back_propagated_one() {
        let dense = [
            3, 1, 4, 10, 0, 9, 2, 7, 1, -100, 5, 5, 6, 3, 9, 8, 4, 6, 1, -100,
        ];
        let sparse = [
            3, -100, 4, 10, -100, 9, 2, -100, 1, -100, 5, -100, 6, 3, -100, 8, 4, -100, 1, 0,
        ];
        for t in [&dense, &sparse] {
            tch::manual_seed(1);
            let opts = (Kind::Double, Device::Cpu);
            let hidden = Tensor::randn([2, 10, 8], opts).set_requires_grad(true);
            let w = Tensor::randn([11, 8], opts);
            let targets = Tensor::from_slice(t).reshape([2, 10]);
            let a = chunked_cross_entropy(&hidden, &w, &targets, 5.0, true, 33).unwrap();
            let (b, g) =
                chunked_cross_entropy_grad(&hidden.detach(), &w, &targets, 5.0, 33).unwrap();
            assert_eq!(a, b);
            let g = g.unwrap();
            assert_eq!(g.size(), hidden.size());
            let d = (hidden.grad() - g).abs().max().double_value(&[]);
            assert!(d < 1e-14, "gradient differs by {d}");
        }
    }

    #[test]
    fn the_f32_kernel_path_equals_the_f64_operator_path() {
        // f32 logits take lora_engine::kernels::cross_entropy_rows; the same
        // data in f64 takes the operator chain. Dense (masked) and gathered
        // rows, several chunks and one.
        let dense = [
            3, 1, 4, 10, 0, 9, 2, 7, 1, -100, 5, 5, 6, 3, 9, 8, 4, 6, 1, -100,
        ];
        let sparse = [
            3, -100, 4, 10, -100, 9, 2, -100, 1, -100, 5, -100, 6, 3, -100, 8, 4, -100, 1, 0,
        ];
        for t in [&dense, &sparse] {
            for chunk in [33, 1 << 20] {
                tch::manual_seed(2);
                let h64 = Tensor::randn([2, 10, 8], (Kind::Double, Device::Cpu));
                let w64 = Tensor::randn([11, 8], (Kind::Double, Device::Cpu));
                let targets = Tensor::from_slice(t).reshape([2, 10]);
                let (s64, g64) =
                    chunked_cross_entropy_grad(&h64, &w64, &targets, 7.0, chunk).unwrap();
                let (h32, w32) = (h64.to_kind(Kind::Float), w64.to_kind(Kind::Float));
                let (s32, g32) =
                    chunked_cross_entropy_grad(&h32, &w32, &targets, 7.0, chunk).unwrap();
                assert_eq!(s32.n_targets, s64.n_targets);
                assert_eq!(s32.n_correct, s64.n_correct);
                assert!((s32.loss_sum - s64.loss_sum).abs() < 1e-5 * s64.loss_sum.abs());
                let (g32, g64) = (g32.unwrap(), g64.unwrap());
                let scale = g64.abs().max().double_value(&[]);
                let d = (g32.to_kind(Kind::Double) - &g64)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(d < 1e-5 * scale, "gradient differs by {d} (scale {scale})");
            }
        }
    }

    #[test]
    fn no_targets_means_no_work() {
        let h = Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu));
        let w = Tensor::zeros([5, 4], (Kind::Float, Device::Cpu));
        let t = Tensor::full([1, 3], IGNORE_INDEX, (Kind::Int64, Device::Cpu));
        let s = chunked_cross_entropy(&h, &w, &t, 1.0, false, 100).unwrap();
        assert_eq!(s, LossStats::default());
    }
}

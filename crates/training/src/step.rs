//! One optimiser step's worth of gradient: forward and backward over the
//! micro-batches of an effective batch, with the loss normalised by the
//! number of target tokens of the whole effective batch.

use tch::Tensor;

use crate::batch::Batch;
use crate::error::Result;
use crate::loss::{LossStats, chunked_cross_entropy};

/// What the trainer needs from a causal language model.
pub trait TrainableModel {
    /// Final hidden states `[B, T, H]` (after the last norm, before the output
    /// projection) for `batch`; `train` enables dropout.
    fn hidden_states(&self, batch: &Batch, train: bool) -> Result<Tensor>;
    /// The frozen output projection `[V, H]` (the tied embedding when tied).
    fn output_weight(&self) -> Tensor;
    /// Called after the loss's backward of each micro-batch: a model that
    /// recomputes activations (checkpointing) back-propagates through its
    /// layers here. Default: nothing (autograd already reached every leaf).
    fn finish_backward(&self) -> Result<()> {
        Ok(())
    }
    /// Forward, loss and backward of one micro-batch by a hand-written pass
    /// (see `lora_engine::fused`), gradients added to the trainable leaves;
    /// `None` when the model has no such pass for this batch (the autograd
    /// path then runs). Default: `None`.
    fn fused_step(
        &self,
        _batch: &Batch,
        _weight: &Tensor,
        _norm: f64,
        _chunk_elements: i64,
    ) -> Result<Option<LossStats>> {
        Ok(None)
    }
}

/// Runs forward and backward over `micro_batches`, accumulating gradients
/// into the model's trainable leaves. Each token counts `1 / N` where `N` is
/// the number of targets over all micro-batches, so the accumulated gradient
/// equals the gradient of the mean token loss of the concatenated batch.
pub fn accumulate_gradients(
    model: &dyn TrainableModel,
    micro_batches: &[Batch],
    chunk_elements: i64,
) -> Result<LossStats> {
    let norm = micro_batches
        .iter()
        .map(|b| b.n_targets)
        .sum::<i64>()
        .max(1) as f64;
    let weight = model.output_weight();
    let mut stats = LossStats::default();
    for mb in micro_batches {
        if mb.n_targets == 0 {
            continue;
        }
        if let Some(s) = model.fused_step(mb, &weight, norm, chunk_elements)? {
            stats.add(s);
            continue;
        }
        let hidden = model.hidden_states(mb, true)?;
        stats.add(chunked_cross_entropy(
            &hidden,
            &weight,
            &mb.targets,
            norm,
            true,
            chunk_elements,
        )?);
        drop(hidden);
        model.finish_backward()?;
    }
    Ok(stats)
}

/// Mean-loss statistics of `batches` without gradients (evaluation).
pub fn evaluate_batches(
    model: &dyn TrainableModel,
    batches: &[Batch],
    chunk_elements: i64,
) -> Result<LossStats> {
    let weight = model.output_weight();
    let mut stats = LossStats::default();
    for b in batches {
        let hidden = tch::no_grad(|| model.hidden_states(b, false))?;
        stats.add(chunked_cross_entropy(
            &hidden,
            &weight,
            &b.targets,
            1.0,
            false,
            chunk_elements,
        )?);
    }
    Ok(stats)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::batch::{TokenizedSample, collate};
    use tch::{Device, Kind};

    /// A toy causal model: frozen embeddings, a trainable low-rank update,
    /// causal mixing by a cumulative mean over positions.
    pub(crate) struct Toy {
        pub emb: Tensor,
        pub a: Tensor,
        pub b: Tensor,
    }

    impl Toy {
        /// Weights from a private ChaCha stream: tests running in parallel
        /// share libtorch's default generator, so `manual_seed` + `randn`
        /// would not give two toys with the same seed the same weights.
        pub(crate) fn new(vocab: i64, h: i64, seed: i64) -> Self {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed as u64);
            let mut draw = |shape: [i64; 2], scale: f64| {
                let v: Vec<f64> = (0..shape[0] * shape[1])
                    .map(|_| rng.random_range(-1.0..1.0) * scale)
                    .collect();
                Tensor::from_slice(&v).reshape(shape)
            };
            Self {
                emb: draw([vocab, h], 1.0),
                a: draw([2, h], 0.5).set_requires_grad(true),
                b: draw([h, 2], 0.5).set_requires_grad(true),
            }
        }
    }

    impl TrainableModel for Toy {
        fn hidden_states(&self, batch: &Batch, _train: bool) -> Result<Tensor> {
            let e = self.emb.index_select(0, &batch.input_ids.reshape([-1]));
            let (bsz, t) = batch.shape();
            let e = e.reshape([bsz, t, -1]);
            let x = &e + e.matmul(&self.a.tr()).matmul(&self.b.tr());
            let counts =
                Tensor::arange_start(1, t + 1, (Kind::Double, Device::Cpu)).reshape([1, t, 1]);
            Ok((x.cumsum(1, Kind::Double) / counts).tanh())
        }
        fn output_weight(&self) -> Tensor {
            self.emb.shallow_clone()
        }
    }

    fn samples() -> Vec<TokenizedSample> {
        let mk = |ids: &[u32], from: usize| TokenizedSample {
            input_ids: ids.to_vec(),
            trainable: (0..ids.len()).map(|i| i >= from).collect(),
        };
        vec![
            mk(&[1, 2, 3, 4, 5, 6, 7], 3),
            mk(&[8, 9], 0),
            mk(&[3, 3, 5, 1, 2], 1),
            mk(&[9, 8, 7, 6, 5, 4, 3, 2, 1], 6),
        ]
    }

    fn grads(m: &Toy) -> (Tensor, Tensor) {
        (m.a.grad().copy(), m.b.grad().copy())
    }

    #[test]
    fn accumulated_gradient_equals_full_batch_gradient() {
        let s = samples();
        let full_rows: Vec<Vec<usize>> = (0..4).map(|i| vec![i]).collect();
        let full = Toy::new(10, 6, 3);
        let fb = collate(&s, &full_rows, 0, 1, Device::Cpu);
        let st_full = accumulate_gradients(&full, &[fb], 1 << 20).unwrap();
        let (ga, gb) = grads(&full);

        // Uneven micro-batches (1 + 3 samples, different widths and target counts).
        let acc = Toy::new(10, 6, 3);
        let m1 = collate(&s, &[vec![0]], 0, 1, Device::Cpu);
        let m2 = collate(&s, &[vec![1], vec![2], vec![3]], 0, 1, Device::Cpu);
        let st_acc = accumulate_gradients(&acc, &[m1, m2], 7).unwrap();
        let (aa, ab) = grads(&acc);

        assert_eq!(st_full.n_targets, st_acc.n_targets);
        assert!((st_full.mean() - st_acc.mean()).abs() < 1e-12);
        let d = (ga - aa)
            .abs()
            .max()
            .double_value(&[])
            .max((gb - ab).abs().max().double_value(&[]));
        assert!(d < 1e-12, "accumulated gradient differs by {d}");
    }

    #[test]
    fn per_micro_batch_mean_would_differ() {
        // The bug this guards against (transformers#34191): averaging each
        // micro-batch's mean gives a different gradient when token counts differ.
        let s = samples();
        let full = Toy::new(10, 6, 3);
        let fb = collate(
            &s,
            &(0..4).map(|i| vec![i]).collect::<Vec<_>>(),
            0,
            1,
            Device::Cpu,
        );
        accumulate_gradients(&full, &[fb], 1 << 20).unwrap();
        let naive = Toy::new(10, 6, 3);
        for rows in [vec![vec![0]], vec![vec![1], vec![2], vec![3]]] {
            let b = collate(&s, &rows, 0, 1, Device::Cpu);
            let h = naive.hidden_states(&b, true).unwrap();
            chunked_cross_entropy(
                &h,
                &naive.emb,
                &b.targets,
                2.0 * b.n_targets as f64,
                true,
                1 << 20,
            )
            .unwrap();
        }
        let d = (full.a.grad() - naive.a.grad())
            .abs()
            .max()
            .double_value(&[]);
        assert!(d > 1e-6, "the naive average should not match ({d})");
    }
}

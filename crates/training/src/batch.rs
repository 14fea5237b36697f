//! From tokenised samples to micro-batches: truncation, the epoch order
//! (seeded shuffle, optional length grouping), optional packing, and
//! collation into tensors with pre-shifted targets.
//!
//! Targets are shifted here, not in the loss: `targets[b, t]` is the token
//! that position `t` must predict, or [`IGNORE_INDEX`]. Shifting per sample
//! means that in a packed row the last token of one sample never learns to
//! predict the first token of the next, and padding never needs a key mask
//! under causal attention (pads sit after every real token of their row).
//! Packed rows carry per-sample position ids and a block-diagonal causal mask,
//! so no sample attends to another (peer-features pain point 11).

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use tch::{Device, Kind, Tensor};

/// Target value of positions that carry no loss (same as PyTorch's default).
pub const IGNORE_INDEX: i64 = -100;

/// One tokenised example: ids and, per token, whether the model learns to produce it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedSample {
    /// Token ids (with BOS/EOS as the template put them).
    pub input_ids: Vec<u32>,
    /// `trainable[i]`: token `i` is a training target (completion tokens; all tokens with `train_on_inputs`).
    pub trainable: Vec<bool>,
}

impl TokenizedSample {
    /// Number of target tokens (trainable tokens after the first position).
    pub fn n_targets(&self) -> usize {
        self.trainable.iter().skip(1).filter(|&&t| t).count()
    }

    /// Truncates to at most `max_len` tokens (keeps the start).
    pub fn truncate(&mut self, max_len: usize) -> bool {
        let cut = self.input_ids.len() > max_len;
        self.input_ids.truncate(max_len);
        self.trainable.truncate(max_len);
        cut
    }
}

/// A row of one batch: the samples (indices) laid out one after another.
pub type Row = Vec<usize>;

/// How the epoch is cut into micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlanConfig {
    /// Rows per micro-batch.
    pub micro_batch_size: usize,
    /// Pack samples into rows of `max_seq_length` tokens.
    pub packing: bool,
    /// Row capacity when packing.
    pub max_seq_length: usize,
    /// Group samples of similar length into the same micro-batch (less padding).
    pub group_by_length: bool,
    /// Data-order seed.
    pub seed: u64,
}

/// Samples per length-grouping window, in micro-batches (as transformers' `LengthGroupedSampler`).
const MEGABATCH_MULT: usize = 50;

/// The micro-batches of epoch `epoch`: a seeded shuffle of the samples,
/// then either length grouping or packing (first fit, in shuffled order),
/// then cutting into micro-batches. Deterministic in `(seed, epoch)`, so a
/// resumed run rebuilds the same order from the checkpointed position.
pub fn epoch_plan(lengths: &[usize], cfg: &BatchPlanConfig, epoch: u64) -> Vec<Vec<Row>> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mb = cfg.micro_batch_size.max(1);
    let rows: Vec<Row> = if cfg.packing {
        pack_first_fit(&order, lengths, cfg.max_seq_length)
    } else if cfg.group_by_length {
        let mut out = Vec::with_capacity(order.len());
        for chunk in order.chunks(mb * MEGABATCH_MULT) {
            let mut c = chunk.to_vec();
            // Longest first; stable so equal lengths keep the shuffled order.
            c.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            out.extend(c.into_iter().map(|i| vec![i]));
        }
        out
    } else {
        order.into_iter().map(|i| vec![i]).collect()
    };
    let mut batches: Vec<Vec<Row>> = rows.chunks(mb).map(|c| c.to_vec()).collect();
    if cfg.group_by_length && !cfg.packing {
        // Grouping put long batches first inside each window; shuffle the batch
        // order so the epoch does not alternate long/short by window.
        batches.shuffle(&mut rng);
    }
    batches
}

/// Packs samples (in the given order) into rows of at most `capacity` tokens,
/// first fit over the open rows. A sample longer than `capacity` must have
/// been truncated before.
fn pack_first_fit(order: &[usize], lengths: &[usize], capacity: usize) -> Vec<Row> {
    let mut rows: Vec<(usize, Row)> = Vec::new();
    for &i in order {
        let len = lengths[i].min(capacity);
        match rows.iter_mut().find(|(used, _)| used + len <= capacity) {
            Some((used, row)) => {
                *used += len;
                row.push(i);
            }
            None => rows.push((len, vec![i])),
        }
    }
    rows.into_iter().map(|(_, r)| r).collect()
}

/// Fraction of row slots that hold real tokens (1.0 = no padding).
pub fn packing_efficiency(batches: &[Vec<Row>], lengths: &[usize]) -> f64 {
    let (mut real, mut slots) = (0usize, 0usize);
    for b in batches {
        let row_len = |r: &Row| r.iter().map(|&i| lengths[i]).sum::<usize>();
        let width = b.iter().map(row_len).max().unwrap_or(0);
        real += b.iter().map(row_len).sum::<usize>();
        slots += width * b.len();
    }
    if slots == 0 {
        1.0
    } else {
        real as f64 / slots as f64
    }
}

/// A collated micro-batch on a device.
#[derive(Debug)]
pub struct Batch {
    /// Token ids `[B, T]` (int64).
    pub input_ids: Tensor,
    /// Shifted targets `[B, T]` (int64, [`IGNORE_INDEX`] where no loss).
    pub targets: Tensor,
    /// Position ids `[B, T]` (int64), restarting at 0 for each packed sample.
    pub position_ids: Tensor,
    /// `[B, 1, T, T]` boolean mask (true = may attend) when rows are packed;
    /// `None` means plain causal attention.
    pub attention_mask: Option<Tensor>,
    /// Number of targets (tokens with loss).
    pub n_targets: i64,
    /// Number of real (non-pad) tokens.
    pub n_tokens: i64,
}

impl Batch {
    /// Batch size and sequence length.
    pub fn shape(&self) -> (i64, i64) {
        let s = self.input_ids.size();
        (s[0], s[1])
    }
}

/// Collates `rows` of `samples` into a [`Batch`] on `device`. The width is
/// the longest row rounded up to a multiple of `pad_multiple` (≥ 1).
pub fn collate(
    samples: &[TokenizedSample],
    rows: &[Row],
    pad_id: u32,
    pad_multiple: usize,
    device: Device,
) -> Batch {
    let row_len = |r: &Row| r.iter().map(|&i| samples[i].input_ids.len()).sum::<usize>();
    let longest = rows.iter().map(row_len).max().unwrap_or(1).max(1);
    let m = pad_multiple.max(1);
    let width = longest.div_ceil(m) * m;
    let b = rows.len();
    let mut ids = vec![i64::from(pad_id); b * width];
    let mut targets = vec![IGNORE_INDEX; b * width];
    let mut pos = vec![0i64; b * width];
    // Segment id per slot: sample number within the row + 1; pads get 0.
    let mut seg = vec![0i64; b * width];
    let packed = rows.iter().any(|r| r.len() > 1);
    let (mut n_targets, mut n_tokens) = (0i64, 0i64);
    for (ri, row) in rows.iter().enumerate() {
        let mut off = ri * width;
        for (si, &sample) in row.iter().enumerate() {
            let s = &samples[sample];
            let n = s.input_ids.len();
            for t in 0..n {
                ids[off + t] = i64::from(s.input_ids[t]);
                pos[off + t] = t as i64;
                seg[off + t] = si as i64 + 1;
                if t + 1 < n && s.trainable[t + 1] {
                    targets[off + t] = i64::from(s.input_ids[t + 1]);
                    n_targets += 1;
                }
            }
            n_tokens += n as i64;
            off += n;
        }
        // Pads continue the positions of the row so that they stay in range.
        let used = row_len(row);
        for t in used..width {
            pos[ri * width + t] = t as i64;
        }
    }
    let shape = [b as i64, width as i64];
    let to = |v: &[i64]| Tensor::from_slice(v).reshape(shape).to_device(device);
    let attention_mask = packed.then(|| {
        let s = to(&seg);
        let same = s.unsqueeze(2).eq_tensor(&s.unsqueeze(1)); // [B,T,T]
        let causal = Tensor::ones([width as i64, width as i64], (Kind::Bool, device)).tril(0);
        // Pads (segment 0) attend to each other only; their outputs carry no loss.
        (same.logical_and(&causal)).unsqueeze(1)
    });
    Batch {
        input_ids: to(&ids),
        targets: to(&targets),
        position_ids: to(&pos),
        attention_mask,
        n_targets,
        n_tokens,
    }
}

/// A sample with every token trainable (pre-training style data, benchmarks).
pub fn all_trainable(ids: Vec<u32>) -> TokenizedSample {
    let n = ids.len();
    TokenizedSample {
        input_ids: ids,
        trainable: vec![true; n],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ids: &[u32], train_from: usize) -> TokenizedSample {
        TokenizedSample {
            input_ids: ids.to_vec(),
            trainable: (0..ids.len()).map(|i| i >= train_from).collect(),
        }
    }

    fn v(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(&t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn targets_are_shifted_and_masked_per_sample() {
        let s = vec![sample(&[10, 11, 12, 13], 2), sample(&[20, 21], 0)];
        let b = collate(&s, &[vec![0], vec![1]], 0, 1, Device::Cpu);
        assert_eq!(b.shape(), (2, 4));
        assert_eq!(v(&b.input_ids), [10, 11, 12, 13, 20, 21, 0, 0]);
        // Prompt is tokens 0..2: position 1 predicts 12 (trainable), position 2 predicts 13.
        assert_eq!(v(&b.targets), [-100, 12, 13, -100, 21, -100, -100, -100]);
        assert_eq!(b.n_targets, 3);
        assert_eq!(b.n_tokens, 6);
        assert!(b.attention_mask.is_none());
    }

    #[test]
    fn packing_restarts_positions_and_blocks_cross_sample_attention() {
        let s = vec![sample(&[1, 2, 3], 0), sample(&[4, 5], 0)];
        let b = collate(&s, &[vec![0, 1]], 0, 8, Device::Cpu);
        assert_eq!(b.shape(), (1, 8));
        assert_eq!(v(&b.position_ids)[..5], [0, 1, 2, 0, 1]);
        // The last token of sample 0 does not predict sample 1's first token.
        assert_eq!(v(&b.targets)[..5], [2, 3, -100, 5, -100]);
        let m = b.attention_mask.unwrap();
        let at = |i: i64, j: i64| m.int64_value(&[0, 0, i, j]) != 0;
        assert!(
            at(2, 0) && at(2, 2) && !at(2, 3),
            "sample 0 sees itself, causally"
        );
        assert!(
            at(4, 3) && !at(4, 2) && !at(3, 0),
            "sample 1 never sees sample 0"
        );
        assert!(!at(0, 1), "causal");
    }

    #[test]
    fn plan_is_deterministic_and_covers_every_sample_once() {
        let lengths: Vec<usize> = (0..103).map(|i| 5 + (i * 37) % 60).collect();
        for (packing, group) in [(false, false), (false, true), (true, false)] {
            let cfg = BatchPlanConfig {
                micro_batch_size: 4,
                packing,
                max_seq_length: 128,
                group_by_length: group,
                seed: 7,
            };
            let a = epoch_plan(&lengths, &cfg, 0);
            assert_eq!(a, epoch_plan(&lengths, &cfg, 0));
            assert_ne!(a, epoch_plan(&lengths, &cfg, 1), "epochs reshuffle");
            let mut seen: Vec<usize> = a.iter().flatten().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..103).collect::<Vec<_>>());
            if packing {
                for row in a.iter().flatten() {
                    assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= 128);
                }
            }
        }
    }

    #[test]
    fn length_grouping_and_packing_reduce_padding() {
        let lengths: Vec<usize> = (0..400).map(|i| 8 + (i * 7919) % 120).collect();
        let base = BatchPlanConfig {
            micro_batch_size: 8,
            packing: false,
            max_seq_length: 256,
            group_by_length: false,
            seed: 1,
        };
        let plain = packing_efficiency(&epoch_plan(&lengths, &base, 0), &lengths);
        let grouped = packing_efficiency(
            &epoch_plan(
                &lengths,
                &BatchPlanConfig {
                    group_by_length: true,
                    ..base
                },
                0,
            ),
            &lengths,
        );
        let packed = packing_efficiency(
            &epoch_plan(
                &lengths,
                &BatchPlanConfig {
                    packing: true,
                    ..base
                },
                0,
            ),
            &lengths,
        );
        assert!(grouped > plain + 0.2, "grouped {grouped} vs plain {plain}");
        assert!(packed > 0.9, "packed {packed}");
    }

    #[test]
    fn truncation_keeps_the_start() {
        let mut s = sample(&[1, 2, 3, 4, 5], 3);
        assert!(s.truncate(4));
        assert_eq!(s.input_ids, [1, 2, 3, 4]);
        assert_eq!(s.n_targets(), 1);
        assert!(!s.truncate(10));
    }
}

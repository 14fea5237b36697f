//! Learning-rate schedules: linear warm-up, then cosine, linear or constant,
//! with the same formulas as transformers' `get_*_schedule_with_warmup`.
//!
//! The schedule is a pure function of the optimiser step, so its checkpointed
//! state is just the step count and the totals.

use lora_spec::trial::LrScheduler;
use serde::{Deserialize, Serialize};

/// A learning-rate schedule over `total_steps` optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Shape after warm-up.
    pub kind: LrScheduler,
    /// Peak learning rate.
    pub peak_lr: f64,
    /// Warm-up steps (linear ramp from 0).
    pub warmup_steps: u64,
    /// All optimiser steps of the run.
    pub total_steps: u64,
}

impl Schedule {
    /// A schedule with warm-up given in steps, or else as a fraction of
    /// `total_steps` (rounded up, as transformers' `get_warmup_steps`).
    pub fn new(
        kind: LrScheduler,
        peak_lr: f64,
        total_steps: u64,
        warmup_steps: Option<u64>,
        warmup_ratio: f64,
    ) -> Self {
        let warmup = warmup_steps
            .unwrap_or_else(|| (warmup_ratio.max(0.0) * total_steps as f64).ceil() as u64);
        Self {
            kind,
            peak_lr,
            warmup_steps: warmup,
            total_steps,
        }
    }

    /// The learning rate for the update made at 0-based optimiser step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.peak_lr * self.factor(step)
    }

    /// The multiplier of the peak learning rate at `step` (in [0, 1]).
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, n) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            LrScheduler::Constant => 1.0,
            LrScheduler::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            LrScheduler::Cosine => {
                let progress = (s - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_ratio_rounds_up_and_ramps_linearly() {
        let s = Schedule::new(LrScheduler::Constant, 1.0, 100, None, 0.03);
        assert_eq!(s.warmup_steps, 3);
        assert_eq!(s.lr_at(0), 0.0);
        assert!((s.lr_at(1) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.lr_at(3), 1.0);
        assert_eq!(s.lr_at(99), 1.0);
        let s = Schedule::new(LrScheduler::Constant, 1.0, 100, Some(10), 0.5);
        assert_eq!(s.warmup_steps, 10, "explicit steps win over the ratio");
    }

    #[test]
    fn cosine_and_linear_match_transformers() {
        // Values of transformers' get_cosine/linear_schedule_with_warmup(opt, 2, 10) lambdas.
        let c = Schedule::new(LrScheduler::Cosine, 2.0, 10, Some(2), 0.0);
        let expect_cos = [
            0.0,
            0.5,
            1.0,
            0.9619397662556434,
            0.8535533905932737,
            0.6913417161825449,
            0.5,
            0.30865828381745514,
            0.14644660940672627,
            0.03806023374435663,
        ];
        for (i, e) in expect_cos.iter().enumerate() {
            assert!((c.factor(i as u64) - e).abs() < 1e-12, "cos step {i}");
            assert!((c.lr_at(i as u64) - 2.0 * e).abs() < 1e-12);
        }
        let l = Schedule::new(LrScheduler::Linear, 1.0, 10, Some(2), 0.0);
        let expect_lin = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
        for (i, e) in expect_lin.iter().enumerate() {
            assert!((l.factor(i as u64) - e).abs() < 1e-12, "lin step {i}");
        }
        assert_eq!(l.factor(10), 0.0);
        assert_eq!(l.factor(20), 0.0);
    }
}

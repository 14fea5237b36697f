//! AdamW with decoupled weight decay, written on tch tensors, plus global
//! gradient-norm clipping.
//!
//! Our own implementation (rather than `tch::nn::Optimizer`, whose state lives
//! inside libtorch) so that the moment estimates and the step count can be
//! saved to and restored from a checkpoint exactly: a resumed run continues
//! bit for bit. The update follows `torch.optim.AdamW` (non-amsgrad,
//! non-foreach) operation by operation:
//!
//! ```text
//! p   ← p · (1 − lr·wd)
//! m   ← β1·m + (1−β1)·g
//! v   ← β2·v + (1−β2)·g²
//! p   ← p − (lr / (1−β1^t)) · m / (sqrt(v) / sqrt(1−β2^t) + ε)
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};

/// AdamW hyper-parameters (the learning rate comes from the schedule each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One trainable parameter and its optimiser state.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over a named set of trainable leaf tensors.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// An optimiser over `params` (name, leaf tensor with `requires_grad`).
    /// Names must be unique; they key the saved state.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let exp_avg = tch::no_grad(|| param.zeros_like());
                let exp_avg_sq = tch::no_grad(|| param.zeros_like());
                Slot {
                    name,
                    param,
                    exp_avg,
                    exp_avg_sq,
                }
            })
            .collect();
        Self {
            cfg,
            slots,
            step: 0,
        }
    }

    /// Optimiser steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> AdamWConfig {
        self.cfg
    }

    /// Number of scalar parameters optimised.
    pub fn numel(&self) -> i64 {
        self.slots.iter().map(|s| s.param.numel() as i64).sum()
    }

    /// Sets every gradient to none (frees the buffers, like `zero_grad(set_to_none=True)`).
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let g = s.param.grad();
            if g.defined() {
                // Zero in place: libtorch accumulates into the same buffer next time,
                // which avoids an allocation per step.
                tch::no_grad(|| {
                    let mut g = g;
                    let _ = g.zero_();
                });
            }
        }
    }

    /// The global L2 norm of all gradients (0 where a gradient is undefined).
    pub fn grad_norm(&self) -> f64 {
        tch::no_grad(|| {
            let mut total = 0.0f64;
            for s in &self.slots {
                let g = s.param.grad();
                if g.defined() {
                    let n = g.to_kind(Kind::Double).square().sum(Kind::Double);
                    total += n.double_value(&[]);
                }
            }
            total.sqrt()
        })
    }

    /// Scales all gradients so that their global norm is at most `max_norm`
    /// (as `torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
    /// `max_norm <= 0` only measures.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        if max_norm > 0.0 && norm.is_finite() {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                tch::no_grad(|| {
                    for s in &self.slots {
                        let mut g = s.param.grad();
                        if g.defined() {
                            let _ = g.g_mul_scalar_(coef);
                        }
                    }
                });
            }
        }
        norm
    }

    /// One update with learning rate `lr` from the current gradients.
    /// Parameters without a gradient are left alone (their state too).
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let bias1 = 1.0 - beta1.powf(t);
        let bias2 = 1.0 - beta2.powf(t);
        let step_size = lr / bias1;
        let bias2_sqrt = bias2.sqrt();
        tch::no_grad(|| {
            for s in &mut self.slots {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                if weight_decay != 0.0 {
                    let _ = s.param.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                let _ = s.exp_avg.lerp_(&g, 1.0 - beta1);
                let _ = s.exp_avg_sq.g_mul_scalar_(beta2);
                let _ = s.exp_avg_sq.g_add_(&(g.square() * (1.0 - beta2)));
                let denom = (s.exp_avg_sq.sqrt() / bias2_sqrt) + eps;
                let _ = s.param.addcdiv_(&(&s.exp_avg * (-step_size)), &denom);
            }
        });
    }

    /// The state to checkpoint: `exp_avg.<name>` and `exp_avg_sq.<name>` tensors (CPU copies).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for s in &self.slots {
            out.push((
                format!("exp_avg.{}", s.name),
                s.exp_avg.to_device(tch::Device::Cpu),
            ));
            out.push((
                format!("exp_avg_sq.{}", s.name),
                s.exp_avg_sq.to_device(tch::Device::Cpu),
            ));
        }
        out
    }

    /// Restores the state written by [`AdamW::state_tensors`] and the step count.
    /// Every parameter must have both moments, with the same shape.
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>, step: u64) -> Result<()> {
        let mut map: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        for s in &mut self.slots {
            for (prefix, dst) in [
                ("exp_avg", &mut s.exp_avg),
                ("exp_avg_sq", &mut s.exp_avg_sq),
            ] {
                let key = format!("{prefix}.{}", s.name);
                let src = map.remove(&key).ok_or_else(|| {
                    TrainError::Engine(format!("optimizer state has no tensor `{key}`"))
                })?;
                if src.size() != dst.size() {
                    return Err(TrainError::Engine(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter has {:?}",
                        src.size(),
                        dst.size()
                    )));
                }
                tch::no_grad(|| dst.copy_(&src));
            }
        }
        if let Some(extra) = map.keys().next() {
            return Err(TrainError::Engine(format!(
                "optimizer state has a tensor `{extra}` that matches no trainable parameter"
            )));
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).set_requires_grad(true)
    }

    #[test]
    fn matches_the_adamw_formula_by_hand() {
        let p = leaf(&[1.0, -2.0]);
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg);
        let (mut x, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        let lr = 0.01;
        for t in 1..=3 {
            opt.zero_grad();
            // loss = sum(p^3) -> grad 3p^2
            let loss = p.pow_tensor_scalar(3).sum(Kind::Float);
            loss.backward();
            opt.step(lr);
            for i in 0..2 {
                let g = 3.0 * x[i] * x[i];
                x[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                x[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = Vec::<f32>::try_from(&p).unwrap();
        for i in 0..2 {
            assert!((f64::from(got[i]) - x[i]).abs() < 1e-5, "{got:?} vs {x:?}");
        }
        assert_eq!(opt.step_count(), 3);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let a = leaf(&[3.0]);
        let b = leaf(&[4.0]);
        let mut opt = AdamW::new(
            vec![
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
            AdamWConfig::default(),
        );
        // grads: d/da a^2/2 = a = 3, d/db = 4 -> norm 5
        let loss = (&a * &a + &b * &b).sum(Kind::Float) * 0.5;
        loss.backward();
        let before = opt.clip_grad_norm(1.0);
        assert!((before - 5.0).abs() < 1e-6);
        assert!((opt.grad_norm() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        let run = |split: bool| -> Vec<f32> {
            let p = leaf(&[0.5, 1.5, -1.0]);
            let mut opt = AdamW::new(
                vec![("w".into(), p.shallow_clone())],
                AdamWConfig::default(),
            );
            let do_step = |opt: &mut AdamW, p: &Tensor| {
                opt.zero_grad();
                p.pow_tensor_scalar(2).sum(Kind::Float).backward();
                opt.step(0.1);
            };
            for _ in 0..2 {
                do_step(&mut opt, &p);
            }
            if split {
                let state = opt.state_tensors();
                let pv = p.detach().copy();
                let p2 = pv.set_requires_grad(true);
                let mut opt2 = AdamW::new(
                    vec![("w".into(), p2.shallow_clone())],
                    AdamWConfig::default(),
                );
                opt2.load_state(state, opt.step_count()).unwrap();
                for _ in 0..2 {
                    do_step(&mut opt2, &p2);
                }
                return Vec::<f32>::try_from(&p2).unwrap();
            }
            for _ in 0..2 {
                do_step(&mut opt, &p);
            }
            Vec::<f32>::try_from(&p).unwrap()
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn load_state_names_a_missing_tensor() {
        let p = leaf(&[1.0]);
        let mut opt = AdamW::new(vec![("w".into(), p)], AdamWConfig::default());
        let err = opt.load_state(vec![], 1).unwrap_err().to_string();
        assert!(err.contains("exp_avg.w"), "{err}");
    }
}

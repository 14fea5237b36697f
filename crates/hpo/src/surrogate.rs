//! `lora-surrogate-v1`: a closed-form, seeded surrogate of LoRA fine-tuning
//! (shared/reference/hpo.md §3.3) on which the strategies are benchmarked
//! and tested. It is cheap (about a microsecond per evaluation) and has the
//! structure that makes LoRA tuning hard:
//!
//! - a ridge in the effective learning rate `lr * alpha / r`, shifted by the
//!   batch size (`z` below, in decades from the task's optimum);
//! - a divergence cliff at high learning rates that warm-up pushes back;
//! - a capacity penalty of low ranks that only shows late in training, and
//!   convergence speed that favours high learning rates early, so learning
//!   curves cross (what fools early stopping);
//! - a cost per trial in device-hours that grows with rank, target modules
//!   and smaller batches.
//!
//! Every random number comes from SplitMix64 so that the Python anchor
//! (`crates/hpo/bench/optuna_anchor.py`) reproduces the same tasks and noise
//! exactly; a test checks both agree to 1e-12.

use lora_spec::contracts::hpo::{
    DecisionAction, HPOInput, HalvingState, IntermediateValue, TrialRecord,
};
use lora_spec::trial::{SearchSpace, TrialConfig};

use crate::HpoError;
use crate::study::{splitmix, suggest};

/// A uniform number in [0, 1) from a SplitMix64 hash of `key`.
pub fn unit(key: u64) -> f64 {
    (splitmix(key) >> 11) as f64 / (1u64 << 53) as f64
}

/// Target-module sets of the benchmark space, in order.
pub const TARGET_SETS: [&[&str]; 3] = [
    &["q_proj", "v_proj"],
    &["q_proj", "k_proj", "v_proj", "o_proj"],
    &["all-linear"],
];
/// Loss offset of each target set (times the task's `tau`).
pub const TARGET_LOSS: [f64; 3] = [1.0, 0.5, 0.0];
/// Cost factor of each target set.
pub const TARGET_COST: [f64; 3] = [1.0, 1.15, 1.5];

/// The benchmark's search space.
pub fn bench_space() -> SearchSpace {
    SearchSpace {
        lr_min: 1e-6,
        lr_max: 1e-2,
        rank_choices: vec![8, 16, 32, 64],
        alpha_ratio_min: 0.5,
        alpha_ratio_max: 4.0,
        dropout_min: 0.0,
        dropout_max: 0.3,
        batch_size_choices: vec![4, 8, 16, 32, 64],
        warmup_ratio_min: 0.0,
        warmup_ratio_max: 0.2,
        target_module_sets: TARGET_SETS
            .iter()
            .map(|s| s.iter().map(|m| m.to_string()).collect())
            .collect(),
        methods: Vec::new(),
    }
}

/// The hyper-parameters the surrogate reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hp {
    /// Learning rate.
    pub lr: f64,
    /// Rank.
    pub rank: f64,
    /// alpha / rank.
    pub ratio: f64,
    /// Dropout.
    pub dropout: f64,
    /// Effective batch size.
    pub batch: f64,
    /// Warm-up ratio.
    pub warmup: f64,
    /// Index into [`TARGET_SETS`].
    pub targets: usize,
}

impl Hp {
    /// Reads a trial config (target set by its number of modules: 2, 4, or all).
    pub fn of(c: &TrialConfig) -> Self {
        let n = c.expanded_targets().len();
        Self {
            lr: c.learning_rate,
            rank: f64::from(c.lora_rank),
            ratio: c.lora_alpha / f64::from(c.lora_rank.max(1)),
            dropout: c.lora_dropout,
            batch: f64::from(c.batch_size),
            warmup: c.warmup_ratio,
            targets: if n <= 2 {
                0
            } else if n <= 4 {
                1
            } else {
                2
            },
        }
    }
}

/// One task instance: the optimum and the sensitivities of a fine-tuning job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Task {
    /// Optimal log10 effective learning rate.
    pub c: f64,
    /// Best batch size.
    pub b_star: f64,
    /// Best dropout.
    pub p_star: f64,
    /// Best warm-up ratio.
    pub w_star: f64,
    /// Need for capacity (low-rank penalty).
    pub kappa: f64,
    /// Loss floor.
    pub l0: f64,
    /// Gain from adapting more modules.
    pub tau: f64,
}

fn softplus(x: f64) -> f64 {
    if x > 30.0 { x } else { x.exp().ln_1p() }
}

impl Task {
    /// Task number `index` (its parameters are SplitMix64 draws).
    pub fn new(index: u64) -> Self {
        let u = |k: u64| unit(index.wrapping_mul(1_000_003).wrapping_add(k));
        Self {
            c: -4.3 + u(0),
            b_star: [8.0, 16.0, 32.0][((u(1) * 3.0) as usize).min(2)],
            p_star: 0.15 * u(2),
            w_star: 0.02 + 0.06 * u(3),
            kappa: 0.05 + 0.25 * u(4),
            l0: 1.0 + u(5),
            tau: 0.02 + 0.06 * u(6),
        }
    }

    /// Decades between the effective learning rate and the task's optimum.
    pub fn z(&self, h: &Hp) -> f64 {
        (h.lr * h.ratio).log10() - self.c - 0.5 * (h.batch / 16.0).log10()
    }

    /// Eval loss after a fraction `t` in (0, 1] of the run (noise-free).
    pub fn loss(&self, h: &Hp, t: f64) -> f64 {
        let z = self.z(h);
        let rank_pen = self.kappa * (8.0 / h.rank).powf(0.7);
        let f = self.l0
            + 0.08 * z * z
            + 0.6 * softplus(6.0 * (z - 0.6 - 4.0 * h.warmup))
            + rank_pen
            + 0.03 * (h.batch / self.b_star).log2().max(0.0).powi(2)
            + 0.4 * (h.dropout - self.p_star).powi(2)
            + 0.5 * (h.warmup - self.w_star).powi(2)
            + self.tau * TARGET_LOSS[h.targets];
        let k = 8.0 * 10f64.powf(z.clamp(-2.0, 0.5)) * (16.0 / h.batch).powf(0.3);
        f - rank_pen * (1.0 - t * t) + 1.5 * (-k * t).exp()
    }

    /// Whether `h` is past the divergence cliff (noisier).
    pub fn past_cliff(&self, h: &Hp) -> bool {
        self.z(h) - 0.6 - 4.0 * h.warmup > 0.0
    }

    /// Device-hours of a full run.
    pub fn cost(&self, h: &Hp) -> f64 {
        (1.0 + 0.1 * (h.rank / 8.0).log2())
            * (1.0 + 0.05 * (16.0 / h.batch).log2())
            * TARGET_COST[h.targets]
    }

    /// The lowest full-run loss over `space` (exact in dropout, grid plus
    /// refinement over the effective learning rate and warm-up).
    pub fn optimum(&self, space: &SearchSpace) -> f64 {
        let p = self.p_star.clamp(space.dropout_min, space.dropout_max);
        let mut best = f64::INFINITY;
        for &r in &space.rank_choices {
            for &b in &space.batch_size_choices {
                for targets in 0..space.target_module_sets.len().min(3) {
                    let lo = (space.lr_min * space.alpha_ratio_min).log10();
                    let hi = (space.lr_max * space.alpha_ratio_max).log10();
                    let eval = |e: f64, w: f64| {
                        let h = Hp {
                            lr: 10f64.powf(e),
                            rank: f64::from(r),
                            ratio: 1.0,
                            dropout: p,
                            batch: f64::from(b),
                            warmup: w,
                            targets,
                        };
                        self.loss(&h, 1.0)
                    };
                    let (wl, wh) = (space.warmup_ratio_min, space.warmup_ratio_max);
                    let (mut be, mut bw, mut bv) = (lo, wl, f64::INFINITY);
                    let ne = 400;
                    let nw = 40;
                    for i in 0..=ne {
                        let e = lo + (hi - lo) * i as f64 / ne as f64;
                        for j in 0..=nw {
                            let w = wl + (wh - wl) * j as f64 / nw as f64;
                            let v = eval(e, w);
                            if v < bv {
                                (be, bw, bv) = (e, w, v);
                            }
                        }
                    }
                    let (se, sw) = ((hi - lo) / ne as f64, (wh - wl) / nw as f64);
                    for i in -50..=50 {
                        let e = (be + se * i as f64 / 50.0).clamp(lo, hi);
                        for j in -50..=50 {
                            let w = (bw + sw * j as f64 / 50.0).clamp(wl, wh);
                            bv = bv.min(eval(e, w));
                        }
                    }
                    best = best.min(bv);
                }
            }
        }
        best
    }
}

/// Observation noise of trial `trial` of run (`task`, `seed`) at `step`:
/// N(0, sd) from two SplitMix64 uniforms (Box-Muller).
pub fn noise(task: u64, seed: u64, trial: u64, step: u64, sd: f64) -> f64 {
    let key = task
        .wrapping_mul(0x9E37_79B9)
        .wrapping_add(seed.wrapping_mul(0x85EB_CA6B))
        .wrapping_add(trial.wrapping_mul(0xC2B2_AE35))
        .wrapping_add(step.wrapping_mul(0x27D4_EB2F));
    let u1 = unit(key).max(1e-300);
    let u2 = unit(key ^ 0x5555_5555_5555_5555);
    sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The observed (noisy) loss: sd 0.01, 0.03 past the divergence cliff.
pub fn observe(
    task_index: u64,
    task: &Task,
    seed: u64,
    trial: u64,
    h: &Hp,
    step: u64,
    steps: u64,
) -> f64 {
    let sd = if task.past_cliff(h) { 0.03 } else { 0.01 };
    task.loss(h, step as f64 / steps as f64) + noise(task_index, seed, trial, step, sd)
}

/// How a benchmark run asks for trials.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// The HPO input template (strategy, settings; history and budget are filled in).
    pub input: HPOInput,
    /// Steps of a full run (intermediate values are reported at rung steps).
    pub steps: u64,
}

/// One finished full-fidelity run: the regret of the recommended config
/// (lowest observed loss) after each trial, noise-free.
pub fn run_full(
    task_index: u64,
    seed: u64,
    trials: usize,
    settings: &RunSettings,
) -> Result<Vec<f64>, HpoError> {
    let task = Task::new(task_index);
    let space = settings.input.search_space.clone();
    let opt = task.optimum(&space);
    let mut history: Vec<TrialRecord> = Vec::new();
    let mut best: Option<(f64, f64)> = None; // (observed, true)
    let mut regrets = Vec::with_capacity(trials);
    for n in 0..trials {
        let mut input = settings.input.clone();
        input.trial_history = history.clone();
        input.trials_remaining = (trials - n) as u32;
        input.seed = Some(seed);
        input.n_suggestions = 1;
        let out = suggest(&input)?;
        let Some(s) = out.suggestions.into_iter().next() else {
            break;
        };
        let h = Hp::of(&s.trial_config);
        let y = observe(
            task_index,
            &task,
            seed,
            n as u64,
            &h,
            settings.steps,
            settings.steps,
        );
        let truth = task.loss(&h, 1.0);
        if best.is_none_or(|b| y < b.0) {
            best = Some((y, truth));
        }
        regrets.push(best.map_or(f64::NAN, |b| b.1 - opt));
        history.push(TrialRecord {
            config: s.trial_config,
            objective: Some(y),
            status: "completed".into(),
            gpu_hours: task.cost(&h),
            intermediate: Vec::new(),
        });
    }
    Ok(regrets)
}

/// Result of a multi-fidelity run.
#[derive(Debug, Clone, PartialEq)]
pub struct FidelityRun {
    /// `(device-hours spent, regret of the best completed trial)` after every completion.
    pub curve: Vec<(f64, f64)>,
    /// Trials started.
    pub started: usize,
    /// Trials that ran to the end.
    pub completed: usize,
}

impl FidelityRun {
    /// Device-hours spent when the regret first reached `target` (none if never).
    pub fn hours_to(&self, target: f64) -> Option<f64> {
        self.curve.iter().find(|p| p.1 <= target).map(|p| p.0)
    }
}

/// A sequential (one worker) run until `max_hours` device-hours are spent.
/// With `strategy: halving` trials stop, continue and get promoted as the
/// skill decides (ASHA, reporting eval loss at rung steps); otherwise every
/// trial runs to the end.
pub fn run_budgeted(
    task_index: u64,
    seed: u64,
    max_hours: f64,
    settings: &RunSettings,
) -> Result<FidelityRun, HpoError> {
    let task = Task::new(task_index);
    let opt = task.optimum(&settings.input.search_space);
    let steps = settings.steps;
    let mut history: Vec<TrialRecord> = Vec::new();
    let mut state = None;
    let mut hours = 0.0;
    let mut best: Option<(f64, f64)> = None;
    let mut run = FidelityRun {
        curve: Vec::new(),
        started: 0,
        completed: 0,
    };
    let ask = |history: &[TrialRecord], state: &Option<HalvingState>, slots: u32, hours: f64| {
        let mut input = settings.input.clone();
        input.trial_history = history.to_vec();
        input.trials_remaining = 10_000;
        input.budget_remaining = max_hours - hours;
        input.seed = Some(seed);
        input.n_suggestions = slots;
        input.halving_state = state.clone();
        suggest(&input)
    };
    while hours < max_hours {
        let out = ask(&history, &state, 1, hours)?;
        state = out.halving_state.clone();
        // The free worker takes a promotion first, else a new trial.
        let (idx, mut until) = if let Some(p) = out
            .decisions
            .iter()
            .find(|d| d.action == DecisionAction::Promote)
        {
            let Some(i) = history.iter().position(|r| r.config.trial_id == p.trial_id) else {
                break;
            };
            history[i].status = "running".into();
            (i, p.run_until_step.unwrap_or(steps))
        } else if let Some(s) = out.suggestions.into_iter().next() {
            history.push(TrialRecord {
                config: s.trial_config,
                objective: None,
                status: "running".into(),
                gpu_hours: 0.0,
                intermediate: Vec::new(),
            });
            run.started += 1;
            (history.len() - 1, s.stop_at_step.unwrap_or(steps))
        } else {
            break;
        };
        loop {
            let h = Hp::of(&history[idx].config);
            let trial_no = u64::from(history[idx].config.trial_id);
            let done = history[idx].intermediate.last().map_or(0, |v| v.step);
            let dh = task.cost(&h) * (until - done) as f64 / steps as f64;
            hours += dh;
            let y = observe(task_index, &task, seed, trial_no, &h, until, steps);
            let rec = &mut history[idx];
            rec.gpu_hours += dh;
            rec.intermediate.push(IntermediateValue {
                step: until,
                value: y,
            });
            if until >= steps {
                rec.status = "completed".into();
                rec.objective = Some(y);
                run.completed += 1;
                let truth = task.loss(&h, 1.0);
                if best.is_none_or(|b| y < b.0) {
                    best = Some((y, truth));
                }
                run.curve
                    .push((hours, best.map_or(f64::NAN, |b| b.1 - opt)));
                break;
            }
            if hours >= max_hours {
                break;
            }
            let out = ask(&history, &state, 0, hours)?;
            state = out.halving_state.clone();
            let id = history[idx].config.trial_id;
            match out.decisions.iter().find(|d| d.trial_id == id) {
                Some(d) if d.action == DecisionAction::Continue => {
                    until = d.run_until_step.unwrap_or(steps)
                }
                _ => {
                    history[idx].status = "pruned".into();
                    break;
                }
            }
        }
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_cross_and_low_rank_shows_late() {
        let t = Task::new(3);
        let base = Hp {
            lr: 10f64.powf(t.c),
            rank: 64.0,
            ratio: 1.0,
            dropout: t.p_star,
            batch: 16.0,
            warmup: t.w_star,
            targets: 2,
        };
        // A slightly-too-low learning rate loses early and wins at the end against a too-high one.
        let low = Hp {
            lr: base.lr * 10f64.powf(-0.35),
            ..base
        };
        let high = Hp {
            lr: base.lr * 10f64.powf(0.45),
            ..base
        };
        assert!(t.loss(&low, 0.1) > t.loss(&high, 0.1));
        assert!(t.loss(&low, 1.0) < t.loss(&high, 1.0));
        // Rank 8 vs 64: equal early, worse at the end.
        let r8 = Hp { rank: 8.0, ..base };
        assert!((t.loss(&r8, 0.01) - t.loss(&base, 0.01)).abs() < 1e-3);
        assert!(t.loss(&r8, 1.0) > t.loss(&base, 1.0) + 0.04);
        // The optimum is below any configuration we can name.
        let opt = t.optimum(&bench_space());
        assert!(opt <= t.loss(&base, 1.0) + 1e-9);
        assert!(opt > t.l0 - 1e-9);
    }

    #[test]
    fn noise_is_standard_normal_ish_and_reproducible() {
        let xs: Vec<f64> = (0..4000).map(|i| noise(1, 2, i, 27, 1.0)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.06 && (var - 1.0).abs() < 0.1, "{mean} {var}");
        assert_eq!(noise(1, 2, 3, 4, 1.0), noise(1, 2, 3, 4, 1.0));
    }
}

//! `suggest`: one call of the HPO skill. Reads the history, places every
//! trial (completed, pruned, running, failed), asks the strategy for points,
//! and returns configs that were never tried and whose predicted cost fits
//! the remaining budget, each with the reason it was chosen.

use std::collections::HashSet;

use lora_spec::contracts::hpo::{
    BanditPolicy, DecisionAction, HPOInput, HPOOutput, Strategy, Suggestion, TrialStatus,
};
use lora_spec::trial::TrialConfig;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::HpoError;
use crate::asha;
use crate::cost::CostModel;
use crate::history::{self, Trial};
use crate::parzen::{Parzen, gaussian};
use crate::space::{DimKind, Param, Point, Space, cat};

/// Candidates tried per suggestion before the strategy gives up.
const MAX_ATTEMPTS: usize = 256;

/// SplitMix64: decorrelates seeds of the per-call random streams.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A reproducible stream for (`seed`, purpose, index).
fn rng_for(seed: u64, tag: u64, idx: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(splitmix(
        seed ^ splitmix(tag.wrapping_mul(0x1000_0001) ^ splitmix(idx)),
    ))
}

/// The default number of space-filling trials before TPE for `auto`: a
/// fifth of the whole study, at least 3 (the seed's value, for short
/// studies) and at most 8. On the surrogate's tuning tasks (disjoint from
/// the reported ones) with 40 trials, 8 beat 3, 5, 10 (Optuna's) and 15 at
/// 20 and 40 trials: fewer leave TPE's good set to one lucky point, more
/// spend trials TPE would use better (docs/BENCHMARKS.md, "HPO").
pub fn default_startup(total_trials: usize) -> u32 {
    (total_trials.div_ceil(5)).clamp(3, 8) as u32
}

/// A Latin-hypercube design of `n` points over `space` (each float dimension
/// cut into `n` strata, one point per stratum, strata paired at random;
/// categorical dimensions stratified the same way over their choices).
pub fn latin_hypercube(space: &Space, n: usize, seed: u64) -> Vec<Point> {
    let mut rng = rng_for(seed, 1, n as u64);
    let mut pts = vec![vec![0.0; space.len()]; n];
    for (d, dim) in space.dims.iter().enumerate() {
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut rng);
        for (i, p) in pts.iter_mut().enumerate() {
            let u = (perm[i] as f64 + rng.random::<f64>()) / n as f64;
            p[d] = match dim.kind {
                DimKind::Float { .. } => u,
                DimKind::Cat { n: c, .. } => ((u * c as f64).floor()).min((c - 1) as f64),
            };
        }
    }
    pts
}

fn uniform<R: Rng>(space: &Space, rng: &mut R) -> Point {
    space
        .dims
        .iter()
        .map(|d| match d.kind {
            DimKind::Float { .. } => rng.random::<f64>(),
            DimKind::Cat { n, .. } => rng.random_range(0..n) as f64,
        })
        .collect()
}

/// A local move around `x`: floats get Gaussian noise (sd 0.1 of the range,
/// reflected at the ends), ordered choices move to a neighbour with
/// probability 0.3, unordered ones are redrawn with probability 0.2.
fn perturb<R: Rng>(space: &Space, x: &[f64], rng: &mut R, keep: Option<usize>) -> Point {
    space
        .dims
        .iter()
        .enumerate()
        .map(|(d, dim)| {
            if keep == Some(d) {
                return x[d];
            }
            match dim.kind {
                DimKind::Float { .. } => {
                    let base = if x[d].is_finite() { x[d] } else { 0.5 };
                    let mut v = base + 0.1 * gaussian(rng);
                    if v < 0.0 {
                        v = -v;
                    }
                    if v > 1.0 {
                        v = 2.0 - v;
                    }
                    v.clamp(0.0, 1.0)
                }
                DimKind::Cat { n, ordered } => {
                    let i = if x[d].is_finite() {
                        cat(x[d], n)
                    } else {
                        rng.random_range(0..n)
                    };
                    if ordered {
                        if rng.random::<f64>() < 0.3 {
                            let up = rng.random::<bool>();
                            if (up && i + 1 < n) || i == 0 {
                                (i + 1).min(n - 1) as f64
                            } else {
                                (i - 1) as f64
                            }
                        } else {
                            i as f64
                        }
                    } else if rng.random::<f64>() < 0.2 {
                        rng.random_range(0..n) as f64
                    } else {
                        i as f64
                    }
                }
            }
        })
        .collect()
}

/// What the strategies share during one call.
struct Ctx<'a> {
    input: &'a HPOInput,
    space: Space,
    seed: u64,
    taken: HashSet<String>,
    cost: Option<CostModel>,
    /// Fraction of a full run a new trial is started for (halving: the first rung).
    start_fraction: f64,
    budget: f64,
    rejected_for_cost: usize,
}

impl Ctx<'_> {
    /// Accepts a point if its config is new and affordable: returns the config and its predicted cost.
    fn accept(&mut self, x: &[f64]) -> Option<(TrialConfig, Option<f64>)> {
        let c = self.space.decode(x);
        if self.taken.contains(&self.space.key(&c)) {
            return None;
        }
        let predicted = self
            .cost
            .as_ref()
            .map(|m| m.predict(&c) * self.start_fraction);
        if predicted.is_some_and(|p| p > self.budget) {
            self.rejected_for_cost += 1;
            return None;
        }
        Some((c, predicted))
    }
}

struct Proposal {
    config: TrialConfig,
    predicted: Option<f64>,
    rationale: String,
    strategy: Strategy,
}

/// NaN or not above zero.
fn not_positive(x: f64) -> bool {
    x.is_nan() || x <= 0.0
}

/// Runs one call of the HPO skill.
pub fn suggest(input: &HPOInput) -> Result<HPOOutput, HpoError> {
    validate(input)?;
    let space = Space::new(&input.search_space, &input.base_config);
    let mut trials = history::parse(&input.trial_history, &space)?;
    let seed = input.seed.unwrap_or(input.base_config.seed);
    let total = input.trial_history.len() + input.trials_remaining as usize;
    let n_startup = match input.strategy {
        Strategy::Bayesian => input.n_startup_trials.unwrap_or(3),
        _ => input
            .n_startup_trials
            .unwrap_or_else(|| default_startup(total)),
    };
    let mut out = HPOOutput {
        suggestions: Vec::new(),
        strategy_used: input.strategy,
        decisions: Vec::new(),
        halving_state: None,
        exhausted_reason: None,
        seed,
        n_startup_trials: n_startup,
    };

    // Halving: rung tables and decisions first (promotions take free workers).
    let mut free = input.n_suggestions as usize;
    let mut start_fraction = 1.0;
    let mut stop_at = None;
    let mut full_steps = None;
    if input.strategy == Strategy::Halving {
        let cfg = asha::resolve(
            &input.halving,
            input.base_config.max_steps,
            &trials,
            input.halving_state.as_ref(),
        )?;
        let (state, decisions) = asha::decide(&trials, cfg, input.halving_state.as_ref(), free);
        let promotions = decisions
            .iter()
            .filter(|d| d.action == DecisionAction::Promote)
            .count();
        free = free.saturating_sub(promotions);
        start_fraction = cfg.0 as f64 / cfg.1 as f64;
        stop_at = Some(cfg.0);
        full_steps = Some(cfg.1);
        out.decisions = decisions;
        out.halving_state = Some(state);
    }

    // Cost model: full-run device-hours of completed trials, and of pruned ones scaled by their progress.
    let obs: Vec<(TrialConfig, f64)> = trials
        .iter()
        .filter_map(|t| match t.status {
            TrialStatus::Completed if t.gpu_hours > 0.0 => Some((t.config.clone(), t.gpu_hours)),
            TrialStatus::Pruned if t.gpu_hours > 0.0 => {
                let full = full_steps?;
                let done = t.last_step().filter(|&s| s > 0)?;
                Some((t.config.clone(), t.gpu_hours * full as f64 / done as f64))
            }
            _ => None,
        })
        .collect();
    let mut ctx = Ctx {
        input,
        taken: trials.iter().map(|t| space.key(&t.config)).collect(),
        space,
        seed,
        cost: CostModel::fit(&obs),
        start_fraction,
        budget: input.budget_remaining,
        rejected_for_cost: 0,
    };

    let want = free.min(input.trials_remaining as usize);
    if free > 0 && input.trials_remaining == 0 {
        out.exhausted_reason = Some("no trials remaining".into());
    } else if want > 0 && not_positive(input.budget_remaining) {
        out.exhausted_reason = Some(format!(
            "no budget remaining ({} device-hours)",
            input.budget_remaining
        ));
        return Ok(out);
    }
    let first_id = trials
        .iter()
        .map(|t| t.id)
        .chain([input.base_config.trial_id])
        .max()
        .unwrap_or(0)
        + 1;
    for next_id in (first_id..).take(want) {
        let proposal = match propose(&mut ctx, &trials, n_startup, total) {
            Some(p) => p,
            None => {
                out.exhausted_reason = Some(if ctx.rejected_for_cost > 0 {
                    format!(
                        "every candidate's predicted cost exceeds the remaining budget of {:.3} device-hours \
                         ({} rejected)",
                        ctx.budget, ctx.rejected_for_cost
                    )
                } else if let Some(n) = ctx.space.finite_size() {
                    format!("all {n} configurations of the search space have been tried")
                } else {
                    "no untried configuration was found".into()
                });
                break;
            }
        };
        let mut config = proposal.config;
        config.trial_id = next_id;
        ctx.taken.insert(ctx.space.key(&config));
        // Later suggestions of this call see this one as running (constant liar).
        trials.push(Trial {
            id: config.trial_id,
            status: TrialStatus::Running,
            point: ctx.space.encode(&config),
            config: config.clone(),
            objective: None,
            gpu_hours: 0.0,
            intermediate: Vec::new(),
        });
        let mut rationale = proposal.rationale;
        rationale.push_str(&format!("; {}", ctx.space.describe(&config)));
        match proposal.predicted {
            Some(p) => rationale.push_str(&format!(
                "; predicted cost {p:.3} of {:.3} device-hours left",
                ctx.budget
            )),
            None => rationale.push_str("; cost unknown until a trial finishes"),
        }
        if let Some(p) = proposal.predicted {
            ctx.budget -= p;
        }
        out.suggestions.push(Suggestion {
            trial_config: config,
            rationale,
            strategy: proposal.strategy,
            predicted_gpu_hours: proposal.predicted,
            stop_at_step: stop_at,
        });
    }
    if input.strategy == Strategy::Auto {
        out.strategy_used = out
            .suggestions
            .last()
            .map(|s| s.strategy)
            .unwrap_or(Strategy::Auto);
    }
    Ok(out)
}

fn validate(input: &HPOInput) -> Result<(), HpoError> {
    if let Some(i) = input.search_space.check().into_iter().next() {
        return Err(HpoError::Invalid {
            field: format!("search_space.{}", i.path),
            message: i.message,
            hint: i.hint.unwrap_or_default(),
        });
    }
    if input.budget_remaining.is_nan() {
        return Err(HpoError::Invalid {
            field: "budget_remaining".into(),
            message: "is NaN".into(),
            hint: "device-hours left, e.g. 8.0".into(),
        });
    }
    if !(0.0..=1.0).contains(&input.epsilon) {
        return Err(HpoError::Invalid {
            field: "epsilon".into(),
            message: format!("must be in [0, 1] (got {})", input.epsilon),
            hint: "the seed's 80/20 split is epsilon 0.2".into(),
        });
    }
    if !(input.tpe.gamma > 0.0 && input.tpe.gamma <= 1.0) {
        return Err(HpoError::Invalid {
            field: "tpe.gamma".into(),
            message: format!("must be in (0, 1] (got {})", input.tpe.gamma),
            hint: "Optuna's default is 0.1".into(),
        });
    }
    if input.tpe.n_ei_candidates == 0 || not_positive(input.tpe.prior_weight) {
        return Err(HpoError::Invalid {
            field: "tpe".into(),
            message: "n_ei_candidates must be >= 1 and prior_weight > 0".into(),
            hint: "defaults: 24 candidates, prior weight 1.0".into(),
        });
    }
    if input.ucb_c.is_nan() || input.ucb_c < 0.0 {
        return Err(HpoError::Invalid {
            field: "ucb_c".into(),
            message: format!("must be >= 0 (got {})", input.ucb_c),
            hint: "1.0 is the UCB1 constant".into(),
        });
    }
    Ok(())
}

fn propose(ctx: &mut Ctx<'_>, trials: &[Trial], n_startup: u32, total: usize) -> Option<Proposal> {
    let ranked = trials
        .iter()
        .filter(|t| {
            t.status == TrialStatus::Completed
                || (t.status == TrialStatus::Pruned && t.last_value().is_some())
        })
        .count();
    let i = trials.len();
    match ctx.input.strategy {
        Strategy::Random => startup(ctx, trials, total.clamp(1, 256), Strategy::Random, false),
        Strategy::Auto | Strategy::Bayesian => {
            if i < n_startup as usize || ranked == 0 {
                startup(
                    ctx,
                    trials,
                    n_startup.max(1) as usize,
                    Strategy::Random,
                    true,
                )
            } else {
                tpe(ctx, trials).or_else(|| startup(ctx, trials, 1, Strategy::Random, false))
            }
        }
        Strategy::Halving => if ctx.input.halving.sampler == Strategy::Bayesian
            && i >= n_startup as usize
            && ranked > 0
        {
            tpe(ctx, trials).or_else(|| startup(ctx, trials, 1, Strategy::Random, false))
        } else {
            startup(ctx, trials, total.clamp(1, 256), Strategy::Random, false)
        }
        .map(|mut p| {
            p.strategy = Strategy::Halving;
            p.rationale = format!("ASHA new trial at rung 0 ({})", p.rationale);
            p
        }),
        Strategy::Bandit => {
            if ranked == 0 {
                return startup(
                    ctx,
                    trials,
                    n_startup.max(1) as usize,
                    Strategy::Bandit,
                    false,
                );
            }
            match ctx.input.bandit_policy {
                BanditPolicy::EpsilonGreedy => epsilon_greedy(ctx, trials),
                BanditPolicy::Ucb => ucb(ctx, trials).or_else(|| epsilon_greedy(ctx, trials)),
            }
        }
    }
}

/// Latin-hypercube point `len(trials)` of a design of `n`, then uniform draws.
fn startup(
    ctx: &mut Ctx<'_>,
    trials: &[Trial],
    n: usize,
    strategy: Strategy,
    then_tpe: bool,
) -> Option<Proposal> {
    let i = trials.len();
    if i < n {
        let design = latin_hypercube(&ctx.space, n, ctx.seed);
        if let Some((config, predicted)) = ctx.accept(&design[i]) {
            let tail = if then_tpe {
                format!("; TPE takes over after {n} trials")
            } else {
                String::new()
            };
            return Some(Proposal {
                config,
                predicted,
                rationale: format!(
                    "space-filling start: Latin-hypercube point {} of {n} (seed {}){tail}",
                    i + 1,
                    ctx.seed
                ),
                strategy,
            });
        }
    }
    let mut rng = rng_for(ctx.seed, 2, i as u64);
    for k in 0..MAX_ATTEMPTS {
        let x = uniform(&ctx.space, &mut rng);
        if let Some((config, predicted)) = ctx.accept(&x) {
            return Some(Proposal {
                config,
                predicted,
                rationale: format!(
                    "uniform random draw (seed {}, stream {i}{})",
                    ctx.seed,
                    if k > 0 {
                        format!(", {k} tried or unaffordable draws skipped")
                    } else {
                        String::new()
                    }
                ),
                strategy,
            });
        }
    }
    None
}

fn best_completed(trials: &[Trial]) -> Option<&Trial> {
    trials
        .iter()
        .filter(|t| t.status == TrialStatus::Completed)
        .min_by(|a, b| {
            a.objective
                .unwrap_or(f64::INFINITY)
                .total_cmp(&b.objective.unwrap_or(f64::INFINITY))
        })
}

/// Tree-structured Parzen estimator (multivariate or independent).
fn tpe(ctx: &mut Ctx<'_>, trials: &[Trial]) -> Option<Proposal> {
    let s = ctx.input.tpe.clone();
    let (good, bad) = history::split(trials, s.gamma);
    if good.is_empty() {
        return None;
    }
    let gp: Vec<&[f64]> = good.iter().map(|&i| trials[i].point.as_slice()).collect();
    let bp: Vec<&[f64]> = bad.iter().map(|&i| trials[i].point.as_slice()).collect();
    let l = Parzen::fit(&ctx.space.dims, &gp, s.prior_weight);
    let g = Parzen::fit(&ctx.space.dims, &bp, s.prior_weight);
    let mut rng = rng_for(ctx.seed, 3, trials.len() as u64);
    let n = s.n_ei_candidates as usize;
    let best = best_completed(trials);
    let best_txt = best
        .map(|b| {
            format!(
                "best so far {:.4} (trial {})",
                b.objective.unwrap_or(f64::NAN),
                b.id
            )
        })
        .unwrap_or_else(|| "no completed trial yet (pruned trials ranked by depth)".into());
    let rounds = MAX_ATTEMPTS.div_ceil(n.max(1));
    for round in 0..rounds {
        let mut cands: Vec<(f64, Point)> = if s.multivariate {
            (0..n)
                .map(|_| {
                    let x = l.sample(&mut rng);
                    (l.log_pdf(&x) - g.log_pdf(&x), x)
                })
                .collect()
        } else {
            // Independent: per dimension, the best of n draws from l_d by l_d/g_d.
            // Later rounds add randomness by taking the k-th best per dimension.
            let mut x = vec![0.0; ctx.space.len()];
            let mut score = 0.0;
            for (d, xd) in x.iter_mut().enumerate() {
                let mut c: Vec<(f64, f64)> = (0..n)
                    .map(|_| {
                        let v = l.sample_dim(d, &mut rng);
                        (l.log_pdf_dim(d, v) - g.log_pdf_dim(d, v), v)
                    })
                    .collect();
                c.sort_by(|a, b| b.0.total_cmp(&a.0));
                let pick = if round == 0 {
                    0
                } else {
                    rng.random_range(0..c.len().min(1 + round))
                };
                *xd = c[pick].1;
                score += c[pick].0;
            }
            vec![(score, x)]
        };
        cands.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (score, x) in cands {
            if let Some((config, predicted)) = ctx.accept(&x) {
                return Some(Proposal {
                    config,
                    predicted,
                    rationale: format!(
                        "TPE ({}, {n} candidates drawn from the good density): {} good / {} bad trials \
                         (gamma {}); highest log l(x)/g(x) = {score:.2}; {best_txt}",
                        if s.multivariate {
                            "multivariate"
                        } else {
                            "independent"
                        },
                        good.len(),
                        bad.len(),
                        s.gamma
                    ),
                    strategy: Strategy::Bayesian,
                });
            }
        }
    }
    None
}

fn epsilon_greedy(ctx: &mut Ctx<'_>, trials: &[Trial]) -> Option<Proposal> {
    let mut rng = rng_for(ctx.seed, 4, trials.len() as u64);
    let eps = ctx.input.epsilon;
    let explore = rng.random::<f64>() < eps;
    let best = best_completed(trials).or_else(|| {
        trials
            .iter()
            .filter(|t| t.status == TrialStatus::Pruned && t.last_value().is_some())
            .min_by(|a, b| {
                a.last_value()
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&b.last_value().unwrap_or(f64::INFINITY))
            })
    })?;
    let (best_id, best_obj, best_x) = (
        best.id,
        best.objective.or(best.last_value()),
        best.point.clone(),
    );
    for _ in 0..MAX_ATTEMPTS {
        let x = if explore {
            uniform(&ctx.space, &mut rng)
        } else {
            perturb(&ctx.space, &best_x, &mut rng, None)
        };
        if let Some((config, predicted)) = ctx.accept(&x) {
            let rationale = if explore {
                format!("epsilon-greedy explore (probability {eps:.2}): uniform random draw")
            } else {
                format!(
                    "epsilon-greedy exploit (probability {:.2}): a local perturbation of the best trial {best_id} \
                     (objective {:.4})",
                    1.0 - eps,
                    best_obj.unwrap_or(f64::NAN)
                )
            };
            return Some(Proposal {
                config,
                predicted,
                rationale,
                strategy: Strategy::Bandit,
            });
        }
    }
    None
}

/// UCB1 with the rank choices as arms.
fn ucb(ctx: &mut Ctx<'_>, trials: &[Trial]) -> Option<Proposal> {
    let d = ctx.space.dims.iter().position(|d| d.param == Param::Rank)?;
    let DimKind::Cat { n: arms, .. } = ctx.space.dims[d].kind else {
        return None;
    };
    let done: Vec<&Trial> = trials
        .iter()
        .filter(|t| t.status == TrialStatus::Completed)
        .collect();
    let lo = done
        .iter()
        .filter_map(|t| t.objective)
        .fold(f64::INFINITY, f64::min);
    let hi = done
        .iter()
        .filter_map(|t| t.objective)
        .fold(f64::NEG_INFINITY, f64::max);
    let reward = |y: f64| if hi > lo { (hi - y) / (hi - lo) } else { 0.5 };
    let mut pulls = vec![0usize; arms];
    let mut sums = vec![0.0; arms];
    for t in trials {
        let x = t.point[d];
        if !x.is_finite() {
            continue;
        }
        let a = cat(x, arms);
        match t.status {
            TrialStatus::Completed => {
                pulls[a] += 1;
                sums[a] += reward(t.objective.unwrap_or(hi));
            }
            // In flight: a pull with no reward yet (pessimistic), so parallel workers spread out.
            TrialStatus::Running | TrialStatus::Planned => pulls[a] += 1,
            _ => {}
        }
    }
    let total: usize = pulls.iter().sum::<usize>().max(1);
    let c = ctx.input.ucb_c;
    let mut order: Vec<(f64, usize)> = (0..arms)
        .map(|a| {
            let s = if pulls[a] == 0 {
                f64::INFINITY
            } else {
                sums[a] / pulls[a] as f64 + c * (2.0 * (total as f64).ln() / pulls[a] as f64).sqrt()
            };
            (s, a)
        })
        .collect();
    order.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let mut rng = rng_for(ctx.seed, 5, trials.len() as u64);
    for (score, arm) in order {
        let arm_best = done
            .iter()
            .filter(|t| t.point[d].is_finite() && cat(t.point[d], arms) == arm)
            .min_by(|a, b| {
                a.objective
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&b.objective.unwrap_or(f64::INFINITY))
            });
        let rank = ctx.space.rank_choices()[arm];
        for _ in 0..MAX_ATTEMPTS / 4 {
            let mut x = match arm_best {
                Some(b) => perturb(&ctx.space, &b.point, &mut rng, Some(d)),
                None => uniform(&ctx.space, &mut rng),
            };
            x[d] = arm as f64;
            if let Some((config, predicted)) = ctx.accept(&x) {
                let why = if pulls[arm] == 0 {
                    format!(
                        "UCB1 over ranks: arm r={rank} has not been played yet; a random config with that rank"
                    )
                } else {
                    format!(
                        "UCB1 over ranks: arm r={rank} has the highest upper bound {score:.3} (mean reward {:.3} over {} \
                         pulls of {total}, c={c}); a perturbation of the arm's best trial {}",
                        sums[arm] / pulls[arm] as f64,
                        pulls[arm],
                        arm_best.map(|b| b.id).unwrap_or(0)
                    )
                };
                return Some(Proposal {
                    config,
                    predicted,
                    rationale: why,
                    strategy: Strategy::Bandit,
                });
            }
        }
    }
    None
}

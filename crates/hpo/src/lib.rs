//! HPOSkill (seed 001 §6): proposes the next trial configurations of a
//! study under a budget.
//!
//! Strategies (all deterministic for a given seed and history):
//! - `random`: a Latin-hypercube design over the whole study, then uniform draws;
//! - `bayesian`: a tree-structured Parzen estimator (good/bad Parzen densities
//!   over the unit cube, log-scaled learning rate, categorical rank, batch size,
//!   target set and method; candidates drawn from l(x) and scored by l(x)/g(x);
//!   independent per-parameter densities by default, multivariate product
//!   kernels on request), after 3 space-filling trials;
//! - `auto`: space-filling trials for the first `clamp(ceil(total/5), 3, 8)`
//!   trials, then TPE;
//! - `bandit`: epsilon-greedy (80% perturb the best / 20% random) or UCB1 over ranks;
//! - `halving`: ASHA over training steps fed with intermediate eval losses,
//!   deciding which running trials continue or stop and which pruned ones are
//!   promoted, with the rung tables returned as state.
//!
//! A config that was tried (or is running) is never proposed again, and a
//! trial whose predicted cost (a regression on the history's device-hours)
//! exceeds the remaining budget is not started.
//!
//! [`surrogate`] is the closed-form LoRA fine-tuning surrogate the benchmark
//! (`examples/hpo_bench.rs`) and the tests run the strategies on.

#![cfg_attr(test, allow(clippy::unwrap_used))] // Tests may unwrap; library code may not.

mod asha;
mod cost;
mod history;
mod parzen;
pub mod space;
mod study;
pub mod surrogate;

use async_trait::async_trait;
use lora_skill::{Skill, SkillContext, SkillError, StepResult};
use lora_spec::contracts::hpo::{HPOInput, HPOOutput};
use lora_spec::contracts::names;

pub use asha::rung_resources;
pub use cost::CostModel;
pub use study::{default_startup, latin_hypercube, splitmix, suggest};

/// Errors of the HPO library.
#[derive(Debug, thiserror::Error)]
pub enum HpoError {
    /// An input field is wrong.
    #[error("{field}: {message} (hint: {hint})")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: String,
    },
}

impl From<HpoError> for SkillError {
    fn from(e: HpoError) -> Self {
        match e {
            HpoError::Invalid {
                field,
                message,
                hint,
            } => {
                let mut s = SkillError::invalid_input(message).with_field(field);
                if !hint.is_empty() {
                    s = s.with_hint(hint);
                }
                s
            }
        }
    }
}

/// The HPO skill (`hpo` in the registry).
#[derive(Debug, Clone, Copy, Default)]
pub struct HpoSkill;

#[async_trait]
impl Skill for HpoSkill {
    type Input = HPOInput;
    type Output = HPOOutput;

    fn name(&self) -> &'static str {
        names::HPO
    }

    fn description(&self) -> &'static str {
        "Proposes the next LoRA trial configurations (random with a Latin-hypercube start, TPE, \
         epsilon-greedy/UCB bandit, or ASHA with continue/stop/promote decisions) from the trial \
         history, never repeating a config and never exceeding the remaining budget."
    }

    async fn run(
        &self,
        input: HPOInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<HPOOutput>, SkillError> {
        ctx.check_cancelled()?;
        let out = suggest(&input)?;
        let mut text = Vec::new();
        for s in &out.suggestions {
            text.push(format!(
                "trial {}: {}",
                s.trial_config.trial_id, s.rationale
            ));
            ctx.info(format!(
                "hpo: trial {}: {}",
                s.trial_config.trial_id, s.rationale
            ));
        }
        for d in &out.decisions {
            text.push(format!(
                "trial {} {:?}: {}",
                d.trial_id, d.action, d.rationale
            ));
        }
        if let Some(r) = &out.exhausted_reason {
            ctx.warn(format!("hpo: {r}"));
            text.push(r.clone());
        }
        Ok(StepResult::new(out.clone())
            .with_text(text.join("\n"))
            .with_meta("strategy_used", out.strategy_used.as_str())
            .with_meta("seed", out.seed)
            .with_meta("suggestions", out.suggestions.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::surrogate::{RunSettings, bench_space, run_budgeted, run_full};
    use lora_skill::{ErrorKind, SkillRegistry};
    use lora_spec::contracts::hpo::{
        BanditPolicy, DecisionAction, HalvingSettings, Strategy, TrialRecord, TrialStatus,
    };
    use lora_spec::trial::{SearchSpace, TrialConfig};
    use std::collections::HashSet;

    fn completed(c: TrialConfig, y: f64, hours: f64) -> TrialRecord {
        TrialRecord {
            config: c,
            objective: Some(y),
            status: "completed".into(),
            gpu_hours: hours,
            intermediate: Vec::new(),
        }
    }

    fn input(strategy: Strategy) -> HPOInput {
        HPOInput {
            strategy,
            trials_remaining: 20,
            budget_remaining: 100.0,
            seed: Some(7),
            ..HPOInput::default()
        }
    }

    /// Runs `n` sequential suggestions with a toy objective; returns the records.
    fn drive(mut inp: HPOInput, n: usize) -> Vec<TrialRecord> {
        let mut hist = Vec::new();
        for k in 0..n {
            inp.trial_history = hist.clone();
            inp.trials_remaining = (n - k) as u32;
            let out = suggest(&inp).unwrap();
            let Some(s) = out.suggestions.into_iter().next() else {
                break;
            };
            assert!(!s.rationale.is_empty());
            let c = s.trial_config;
            let y = (c.learning_rate.log10() + 3.7).powi(2) + 16.0 / f64::from(c.lora_rank);
            hist.push(completed(c, y, 1.0));
        }
        hist
    }

    #[test]
    fn every_strategy_is_deterministic_per_seed_and_never_repeats() {
        for (strategy, policy) in [
            (Strategy::Random, BanditPolicy::EpsilonGreedy),
            (Strategy::Bayesian, BanditPolicy::EpsilonGreedy),
            (Strategy::Auto, BanditPolicy::EpsilonGreedy),
            (Strategy::Bandit, BanditPolicy::EpsilonGreedy),
            (Strategy::Bandit, BanditPolicy::Ucb),
        ] {
            let inp = HPOInput {
                bandit_policy: policy,
                ..input(strategy)
            };
            let a = drive(inp.clone(), 15);
            let b = drive(inp.clone(), 15);
            assert_eq!(a, b, "{strategy:?} is not deterministic");
            let other = drive(
                HPOInput {
                    seed: Some(8),
                    ..inp
                },
                15,
            );
            assert_ne!(a, other, "{strategy:?} ignores the seed");
            let space = space::Space::new(&SearchSpace::default(), &TrialConfig::default());
            let keys: HashSet<String> = a.iter().map(|r| space.key(&r.config)).collect();
            assert_eq!(keys.len(), a.len(), "{strategy:?} repeated a config");
            let ids: Vec<u32> = a.iter().map(|r| r.config.trial_id).collect();
            assert_eq!(ids, (1..=15).collect::<Vec<_>>());
            assert!(a.iter().all(|r| r.config.check().is_empty()));
        }
    }

    #[test]
    fn a_finite_space_is_exhausted_without_repeats() {
        let space = SearchSpace {
            lr_min: 1e-4,
            lr_max: 1e-4,
            rank_choices: vec![8, 16],
            alpha_ratio_max: 1.0,
            dropout_max: 0.0,
            batch_size_choices: vec![8, 16],
            warmup_ratio_max: 0.0,
            target_module_sets: vec![vec!["q_proj".into()]],
            ..SearchSpace::default()
        };
        for strategy in [Strategy::Auto, Strategy::Bandit, Strategy::Random] {
            let hist = drive(
                HPOInput {
                    search_space: space.clone(),
                    ..input(strategy)
                },
                6,
            );
            assert_eq!(hist.len(), 4, "{strategy:?}");
            let out = suggest(&HPOInput {
                search_space: space.clone(),
                trial_history: hist,
                ..input(strategy)
            })
            .unwrap();
            assert!(out.suggestions.is_empty());
            assert!(
                out.exhausted_reason
                    .unwrap()
                    .contains("all 4 configurations")
            );
        }
    }

    #[test]
    fn auto_starts_space_filling_then_switches_to_tpe() {
        let hist = drive(input(Strategy::Auto), 6);
        let mut inp = input(Strategy::Auto);
        inp.trials_remaining = 22; // total 25 -> 5 startup trials
        inp.trial_history = hist[..3].to_vec();
        let out = suggest(&inp).unwrap();
        assert_eq!(out.n_startup_trials, 5);
        assert_eq!(out.strategy_used, Strategy::Random);
        assert!(
            out.suggestions[0]
                .rationale
                .contains("Latin-hypercube point 4 of 5")
        );
        inp.trial_history = hist[..5].to_vec();
        inp.trials_remaining = 20;
        let out = suggest(&inp).unwrap();
        assert_eq!(out.strategy_used, Strategy::Bayesian);
        assert!(
            out.suggestions[0].rationale.contains("l(x)/g(x)"),
            "{}",
            out.suggestions[0].rationale
        );
    }

    #[test]
    fn latin_hypercube_puts_one_point_in_each_stratum() {
        let s = space::Space::new(&SearchSpace::default(), &TrialConfig::default());
        let pts = latin_hypercube(&s, 8, 3);
        for (d, dim) in s.dims.iter().enumerate() {
            if let space::DimKind::Float { .. } = dim.kind {
                let mut strata: Vec<usize> = pts.iter().map(|p| (p[d] * 8.0) as usize).collect();
                strata.sort();
                assert_eq!(strata, (0..8).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn parallel_suggestions_differ_and_running_trials_are_not_repeated() {
        let hist = drive(input(Strategy::Bayesian), 8);
        let mut running = hist[7].clone();
        running.status = "running".into();
        running.objective = None;
        let mut inp = input(Strategy::Bayesian);
        inp.trial_history = hist[..7].to_vec();
        inp.trial_history.push(running.clone());
        inp.n_suggestions = 4;
        let out = suggest(&inp).unwrap();
        assert_eq!(out.suggestions.len(), 4);
        let s = space::Space::new(&SearchSpace::default(), &TrialConfig::default());
        let mut keys: HashSet<String> =
            inp.trial_history.iter().map(|r| s.key(&r.config)).collect();
        for sug in &out.suggestions {
            assert!(keys.insert(s.key(&sug.trial_config)));
        }
        assert_eq!(out.suggestions[3].trial_config.trial_id, 12);
    }

    #[test]
    fn a_trial_predicted_to_exceed_the_budget_is_not_started() {
        let hist = vec![completed(
            TrialConfig {
                trial_id: 1,
                ..TrialConfig::default()
            },
            1.0,
            2.0,
        )];
        let mut inp = input(Strategy::Random);
        inp.trial_history = hist;
        inp.budget_remaining = 1.0;
        let out = suggest(&inp).unwrap();
        assert!(out.suggestions.is_empty());
        assert!(out.exhausted_reason.unwrap().contains("predicted cost"));
        inp.budget_remaining = 5.0;
        let out = suggest(&inp).unwrap();
        let p = out.suggestions[0].predicted_gpu_hours.unwrap();
        assert!(p > 1.0 && p < 5.0, "{p}");
        inp.budget_remaining = 0.0;
        assert!(
            suggest(&inp)
                .unwrap()
                .exhausted_reason
                .unwrap()
                .contains("no budget")
        );
    }

    #[test]
    fn pruned_and_failed_trials_are_handled_explicitly() {
        let mut hist = drive(input(Strategy::Bayesian), 6);
        hist[0].status = "failed".into();
        hist[0].objective = None;
        hist[1].status = "pruned".into();
        hist[1].objective = None;
        hist[1].intermediate = vec![lora_spec::contracts::hpo::IntermediateValue {
            step: 10,
            value: 0.1,
        }];
        hist[2].status = "pruned".into(); // no intermediate value: a bad point
        hist[2].objective = None;
        let mut inp = input(Strategy::Bayesian);
        inp.trial_history = hist.clone();
        let out = suggest(&inp).unwrap();
        assert_eq!(out.suggestions.len(), 1);
        // Nothing in the history is proposed again, whatever its status.
        let s = space::Space::new(&SearchSpace::default(), &TrialConfig::default());
        assert!(
            hist.iter()
                .all(|r| s.key(&r.config) != s.key(&out.suggestions[0].trial_config))
        );
        assert_eq!(TrialStatus::parse("PAUSED"), Some(TrialStatus::Pruned));
    }

    #[test]
    fn halving_prunes_promotes_and_completes_on_the_surrogate() {
        let settings = RunSettings {
            input: HPOInput {
                strategy: Strategy::Halving,
                search_space: bench_space(),
                halving: HalvingSettings {
                    max_resource: 27,
                    ..HalvingSettings::default()
                },
                ..HPOInput::default()
            },
            steps: 27,
        };
        let run = run_budgeted(0, 1, 12.0, &settings).unwrap();
        assert!(run.started > run.completed * 3, "{run:?}");
        assert!(run.completed >= 2, "{run:?}");
        assert!(run.curve.windows(2).all(|w| w[1].1 <= w[0].1 + 1e-12));
        // The state carries the rung tables: 3, 9, 27 steps.
        let mut inp = settings.input.clone();
        inp.seed = Some(1);
        let out = suggest(&inp).unwrap();
        let st = out.halving_state.unwrap();
        assert_eq!(
            st.rungs.iter().map(|r| r.resource).collect::<Vec<_>>(),
            vec![3, 9, 27]
        );
        assert_eq!(out.suggestions[0].stop_at_step, Some(3));
        assert!(
            out.decisions
                .iter()
                .all(|d| d.action != DecisionAction::Promote)
        );
    }

    #[test]
    fn tpe_beats_random_on_the_surrogate() {
        let run = |strategy| {
            let s = RunSettings {
                input: HPOInput {
                    strategy,
                    search_space: bench_space(),
                    ..HPOInput::default()
                },
                steps: 27,
            };
            let mut r: Vec<f64> = (0..8)
                .map(|task| *run_full(100 + task, 1, 30, &s).unwrap().last().unwrap())
                .collect();
            r.sort_by(f64::total_cmp);
            (r[3] + r[4]) / 2.0
        };
        let (tpe, random) = (run(Strategy::Auto), run(Strategy::Random));
        assert!(
            tpe < random,
            "median regret after 30 trials: tpe {tpe} vs random {random}"
        );
    }

    #[tokio::test]
    async fn the_skill_runs_through_the_registry_and_names_bad_fields() {
        let reg = SkillRegistry::new().with(HpoSkill);
        let ctx = lora_skill::SkillContext::new(std::env::temp_dir());
        let ok = reg
            .get("hpo")
            .unwrap()
            .call_json(serde_json::json!({"budget_remaining": 5.0, "trials_remaining": 3, "strategy": "random"}), &ctx)
            .await
            .unwrap();
        assert_eq!(ok.data["suggestions"].as_array().unwrap().len(), 1);
        assert!(ok.output_text.contains("Latin-hypercube"));
        let bad = reg
            .get("hpo")
            .unwrap()
            .call_json(
                serde_json::json!({
                    "budget_remaining": 5.0, "trials_remaining": 3,
                    "search_space": {"lr_min": 1e-3, "lr_max": 1e-4}
                }),
                &ctx,
            )
            .await
            .unwrap_err();
        assert_eq!(bad.kind, ErrorKind::InvalidInput);
        assert_eq!(bad.field.as_deref(), Some("search_space.lr_min"));
        let bad = reg
            .get("hpo")
            .unwrap()
            .call_json(
                serde_json::json!({
                    "budget_remaining": 5.0, "trials_remaining": 3,
                    "trial_history": [{"config": {}, "objective": 1.0, "status": "weird"}]
                }),
                &ctx,
            )
            .await
            .unwrap_err();
        assert_eq!(bad.field.as_deref(), Some("trial_history[0].status"));
    }
}

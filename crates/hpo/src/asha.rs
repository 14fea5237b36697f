//! Asynchronous successive halving (ASHA, Li et al. 2020) over training
//! steps, with promotions: rungs at `r_min * eta^k` steps up to the full run;
//! a trial that reaches rung k is promoted (continues, or later resumes from
//! its checkpoint) when it is among the best `floor(n_k / eta)` of the `n_k`
//! results recorded there, and is stopped (pruned, for now) otherwise. The
//! rung tables are rebuilt from the trials' intermediate eval losses and
//! merged with the tables of the previous call, so a value recorded once is
//! never lost and a promotion is never revoked.

use std::collections::{BTreeMap, BTreeSet};

use lora_spec::contracts::hpo::{
    DecisionAction, HalvingSettings, HalvingState, Rung, RungEntry, TrialDecision, TrialStatus,
};

use crate::HpoError;
use crate::history::Trial;

/// Rung resources `r_min, r_min*eta, ..., max` (the last one is always `max`).
pub fn rung_resources(min: u64, max: u64, eta: u32) -> Vec<u64> {
    let mut out = Vec::new();
    let mut r = min.max(1);
    while r < max {
        out.push(r);
        r = r.saturating_mul(u64::from(eta.max(2)));
    }
    out.push(max);
    out
}

/// The resolved settings: (min resource, max resource, eta).
pub fn resolve(
    s: &HalvingSettings,
    base_max_steps: Option<u64>,
    history: &[Trial],
    prior: Option<&HalvingState>,
) -> Result<(u64, u64, u32), HpoError> {
    if s.reduction_factor < 2 {
        return Err(HpoError::Invalid {
            field: "halving.reduction_factor".into(),
            message: format!("must be at least 2 (got {})", s.reduction_factor),
            hint: "3 keeps the best third of each rung".into(),
        });
    }
    let eta = s.reduction_factor;
    let max = if s.max_resource > 0 {
        s.max_resource
    } else if let Some(m) = base_max_steps {
        m
    } else if let Some(p) = prior.filter(|p| p.max_resource > 0) {
        p.max_resource
    } else {
        history
            .iter()
            .filter(|t| t.status == TrialStatus::Completed)
            .filter_map(|t| t.intermediate.last().map(|v| v.step))
            .max()
            .ok_or_else(|| HpoError::Invalid {
                field: "halving.max_resource".into(),
                message: "the length of a full trial in steps is unknown".into(),
                hint: "set halving.max_resource, or base_config.max_steps".into(),
            })?
    };
    let eta2 = u64::from(eta) * u64::from(eta);
    let min = if s.min_resource > 0 {
        s.min_resource
    } else {
        (max / eta2).max(1)
    };
    if min > max {
        return Err(HpoError::Invalid {
            field: "halving.min_resource".into(),
            message: format!("{min} is more than max_resource {max}"),
            hint: "the first rung must come before the end of the run".into(),
        });
    }
    Ok((min, max, eta))
}

/// The value a trial recorded at a rung: its first intermediate result at or
/// after the rung's step and before the next rung's (the objective for a
/// completed trial at the last rung).
fn value_at(t: &Trial, k: usize, res: &[u64]) -> Option<f64> {
    let r = res[k];
    let next = res.get(k + 1).copied().unwrap_or(u64::MAX);
    if k + 1 == res.len()
        && t.status == TrialStatus::Completed
        && let Some(o) = t.objective
    {
        return Some(o);
    }
    t.intermediate
        .iter()
        .find(|v| v.step >= r && v.step < next && v.value.is_finite())
        .map(|v| v.value)
}

/// Builds the rung tables and the decisions for the running and pruned trials.
/// `free_slots` bounds the promotions (each takes a worker).
pub fn decide(
    history: &[Trial],
    (min, max, eta): (u64, u64, u32),
    prior: Option<&HalvingState>,
    free_slots: usize,
) -> (HalvingState, Vec<TrialDecision>) {
    let res = rung_resources(min, max, eta);
    let by_id: BTreeMap<u32, &Trial> = history.iter().map(|t| (t.id, t)).collect();
    // rung -> trial -> (value, promoted)
    let mut table: Vec<BTreeMap<u32, (f64, bool)>> = vec![BTreeMap::new(); res.len()];
    // Values persisted by the previous call survive (same resources only).
    if let Some(p) = prior {
        for rung in &p.rungs {
            if let Some(k) = res.iter().position(|&r| r == rung.resource) {
                for e in &rung.entries {
                    table[k].insert(e.trial_id, (e.value, e.promoted));
                }
            }
        }
    }
    for t in history {
        if t.status == TrialStatus::Failed {
            continue;
        }
        for (k, rung) in table.iter_mut().enumerate() {
            if let Some(v) = value_at(t, k, &res) {
                let slot = rung.entry(t.id).or_insert((v, false));
                slot.0 = v;
            }
        }
    }
    // Promotion flags: a value at a higher rung, a running trial past the rung, or a completed trial.
    for k in 0..res.len().saturating_sub(1) {
        let higher: BTreeSet<u32> = table[k + 1].keys().copied().collect();
        for (id, slot) in table[k].iter_mut() {
            if higher.contains(id) {
                slot.1 = true;
            }
            if let Some(t) = by_id.get(id) {
                let past = t.last_step().is_some_and(|s| s > res[k]);
                if t.status == TrialStatus::Completed || (t.status == TrialStatus::Running && past)
                {
                    slot.1 = true;
                }
            }
        }
    }
    let mut decisions = Vec::new();
    let mut promotions = Vec::new();
    let mut decided: BTreeSet<u32> = BTreeSet::new();
    // Highest rung first: the best unpromoted results among the top floor(n/eta).
    for k in (0..res.len().saturating_sub(1)).rev() {
        let n = table[k].len();
        let top = n / eta as usize;
        let mut ranked: Vec<(u32, f64, bool)> =
            table[k].iter().map(|(&id, &(v, p))| (id, v, p)).collect();
        ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        for (rank, &(id, v, promoted)) in ranked.iter().enumerate() {
            if promoted || decided.contains(&id) {
                continue;
            }
            let Some(t) = by_id.get(&id) else { continue };
            let at_rung_now = t.last_step().is_none_or(|s| s < res[k + 1]);
            if !at_rung_now {
                continue;
            }
            let why = format!(
                "rung {k} ({} steps): eval loss {v:.4} ranks {} of {n}; the best {top} (1/{eta}) go on",
                res[k],
                rank + 1
            );
            match t.status {
                TrialStatus::Running | TrialStatus::Planned => {
                    decided.insert(id);
                    if rank < top {
                        table[k].entry(id).and_modify(|s| s.1 = true);
                        decisions.push(TrialDecision {
                            trial_id: id,
                            action: DecisionAction::Continue,
                            rung: k as u32,
                            run_until_step: Some(res[k + 1]),
                            rationale: format!("continue to {} steps: {why}", res[k + 1]),
                        });
                    } else {
                        decisions.push(TrialDecision {
                            trial_id: id,
                            action: DecisionAction::Stop,
                            rung: k as u32,
                            run_until_step: None,
                            rationale: format!(
                                "stop (pruned; may be promoted later as more trials reach this rung): {why}"
                            ),
                        });
                    }
                }
                TrialStatus::Pruned if rank < top && promotions.len() < free_slots => {
                    decided.insert(id);
                    table[k].entry(id).and_modify(|s| s.1 = true);
                    promotions.push(TrialDecision {
                        trial_id: id,
                        action: DecisionAction::Promote,
                        rung: k as u32,
                        run_until_step: Some(res[k + 1]),
                        rationale: format!(
                            "promote: resume from the checkpoint to {} steps: {why}",
                            res[k + 1]
                        ),
                    });
                }
                _ => {}
            }
        }
    }
    // Running trials that have not reached their next rung yet simply go on.
    for t in history {
        if !matches!(t.status, TrialStatus::Running | TrialStatus::Planned)
            || decided.contains(&t.id)
        {
            continue;
        }
        let done = t.last_step().unwrap_or(0);
        if let Some(k) = res.iter().position(|&r| r > done) {
            decisions.push(TrialDecision {
                trial_id: t.id,
                action: DecisionAction::Continue,
                rung: k as u32,
                run_until_step: Some(res[k]),
                rationale: format!(
                    "continue: {done} of {} steps done, next rung at {}",
                    res[k], res[k]
                ),
            });
        }
    }
    promotions.extend(decisions);
    let rungs = res
        .iter()
        .enumerate()
        .map(|(k, &r)| Rung {
            index: k as u32,
            resource: r,
            entries: table[k]
                .iter()
                .map(|(&id, &(value, promoted))| RungEntry {
                    trial_id: id,
                    value,
                    promoted,
                })
                .collect(),
        })
        .collect();
    (
        HalvingState {
            reduction_factor: eta,
            min_resource: min,
            max_resource: max,
            rungs,
        },
        promotions,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_spec::contracts::hpo::IntermediateValue;
    use lora_spec::trial::TrialConfig;

    fn trial(id: u32, status: TrialStatus, vals: &[(u64, f64)]) -> Trial {
        Trial {
            id,
            status,
            config: TrialConfig::default(),
            point: Vec::new(),
            objective: if status == TrialStatus::Completed {
                vals.last().map(|v| v.1)
            } else {
                None
            },
            gpu_hours: 0.0,
            intermediate: vals
                .iter()
                .map(|&(step, value)| IntermediateValue { step, value })
                .collect(),
        }
    }

    #[test]
    fn rungs_follow_eta() {
        assert_eq!(rung_resources(3, 27, 3), vec![3, 9, 27]);
        assert_eq!(rung_resources(1, 10, 3), vec![1, 3, 9, 10]);
        assert_eq!(rung_resources(5, 5, 3), vec![5]);
    }

    #[test]
    fn first_trials_pause_then_the_best_is_promoted() {
        let cfg = (3, 27, 3);
        // Two trials at rung 0: floor(2/3) = 0, so the running one stops.
        let h = vec![
            trial(1, TrialStatus::Pruned, &[(3, 0.9)]),
            trial(2, TrialStatus::Running, &[(3, 0.5)]),
        ];
        let (_, d) = decide(&h, cfg, None, 1);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].trial_id, d[0].action), (2, DecisionAction::Stop));
        // A third result: the best of three (trial 2, pruned) is promoted to 9 steps.
        let h = vec![
            trial(1, TrialStatus::Pruned, &[(3, 0.9)]),
            trial(2, TrialStatus::Pruned, &[(3, 0.5)]),
            trial(3, TrialStatus::Running, &[(3, 0.7)]),
        ];
        let (state, d) = decide(&h, cfg, None, 1);
        assert_eq!(d[0].action, DecisionAction::Promote);
        assert_eq!((d[0].trial_id, d[0].run_until_step), (2, Some(9)));
        assert_eq!(d[1].action, DecisionAction::Stop);
        assert_eq!(d[1].trial_id, 3);
        assert_eq!(state.rungs[0].entries.len(), 3);
        assert!(
            state.rungs[0]
                .entries
                .iter()
                .any(|e| e.trial_id == 2 && e.promoted)
        );
        // With no free worker nothing is promoted, but the running trial is still decided.
        let (_, d) = decide(&h, cfg, None, 0);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].action, DecisionAction::Stop);
    }

    #[test]
    fn a_running_leader_continues_and_state_survives_a_lost_history() {
        let cfg = (3, 27, 3);
        let h = vec![
            trial(1, TrialStatus::Pruned, &[(3, 0.9)]),
            trial(2, TrialStatus::Pruned, &[(3, 0.8)]),
            trial(3, TrialStatus::Running, &[(3, 0.2)]),
        ];
        let (state, d) = decide(&h, cfg, None, 0);
        assert_eq!(d[0].action, DecisionAction::Continue);
        assert_eq!(d[0].run_until_step, Some(9));
        // The caller forgot trial 1's intermediates: the persisted table still has them.
        let h2 = vec![
            trial(1, TrialStatus::Pruned, &[]),
            trial(2, TrialStatus::Pruned, &[(3, 0.8)]),
            trial(3, TrialStatus::Running, &[(3, 0.2), (6, 0.15)]),
        ];
        let (s2, d2) = decide(&h2, cfg, Some(&state), 0);
        assert_eq!(s2.rungs[0].entries.len(), 3);
        assert_eq!(d2[0].action, DecisionAction::Continue);
        assert_eq!(d2[0].run_until_step, Some(9));
    }

    #[test]
    fn resolve_needs_a_max() {
        let s = HalvingSettings::default();
        assert!(resolve(&s, None, &[], None).is_err());
        assert_eq!(resolve(&s, Some(90), &[], None).unwrap(), (10, 90, 3));
        let bad = HalvingSettings {
            reduction_factor: 1,
            ..s
        };
        assert!(resolve(&bad, Some(90), &[], None).is_err());
    }
}

//! The trial history as the samplers read it: statuses parsed, points
//! encoded, and the good/bad split of TPE with pruned, running and failed
//! trials each placed explicitly.

use lora_spec::contracts::hpo::{IntermediateValue, TrialRecord, TrialStatus};
use lora_spec::trial::TrialConfig;

use crate::HpoError;
use crate::space::{Point, Space};

/// One trial of the history.
#[derive(Debug, Clone)]
pub struct Trial {
    /// `config.trial_id`.
    pub id: u32,
    /// Parsed status.
    pub status: TrialStatus,
    /// Its config.
    pub config: TrialConfig,
    /// Its point in the unit cube.
    pub point: Point,
    /// Objective (completed trials).
    pub objective: Option<f64>,
    /// Device-hours used.
    pub gpu_hours: f64,
    /// Intermediate values, sorted by step.
    pub intermediate: Vec<IntermediateValue>,
}

impl Trial {
    /// The last step with an intermediate value.
    pub fn last_step(&self) -> Option<u64> {
        self.intermediate.last().map(|v| v.step)
    }

    /// The last intermediate value.
    pub fn last_value(&self) -> Option<f64> {
        self.intermediate.last().map(|v| v.value)
    }
}

/// Parses the records (statuses, objectives) and encodes them.
pub fn parse(records: &[TrialRecord], space: &Space) -> Result<Vec<Trial>, HpoError> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let status = TrialStatus::parse(&r.status).ok_or_else(|| HpoError::Invalid {
                field: format!("trial_history[{i}].status"),
                message: format!("unknown status `{}`", r.status),
                hint: "one of planned, running, completed, pruned, failed".into(),
            })?;
            let objective = r.objective.filter(|o| o.is_finite());
            // A completed trial without a finite objective is a failure (NaN loss).
            let status = if status == TrialStatus::Completed && objective.is_none() {
                TrialStatus::Failed
            } else {
                status
            };
            let mut intermediate = r.intermediate.clone();
            intermediate.sort_by_key(|v| v.step);
            Ok(Trial {
                id: r.config.trial_id,
                status,
                config: r.config.clone(),
                point: space.encode(&r.config),
                objective,
                gpu_hours: r.gpu_hours,
                intermediate,
            })
        })
        .collect()
}

/// TPE's split: `(good, bad)` indices into `trials`, each in trial order.
///
/// Completed trials are ranked by objective; pruned trials with an
/// intermediate value follow, deepest first, then by their last value
/// (Optuna's rule). The best `n_good = min(ceil(gamma * n), 25)` (at least
/// one) of the ranked trials are good; the other ranked trials are bad, and
/// so are running/planned trials (a constant liar: parallel workers are
/// steered away from configs in flight) and failed trials (a crash or a
/// divergence marks its region as bad instead of being forgotten).
pub fn split(trials: &[Trial], gamma: f64) -> (Vec<usize>, Vec<usize>) {
    let mut done: Vec<usize> = (0..trials.len())
        .filter(|&i| trials[i].status == TrialStatus::Completed)
        .collect();
    done.sort_by(|&a, &b| {
        let (x, y) = (
            trials[a].objective.unwrap_or(f64::INFINITY),
            trials[b].objective.unwrap_or(f64::INFINITY),
        );
        x.total_cmp(&y).then(trials[a].id.cmp(&trials[b].id))
    });
    let mut pruned: Vec<usize> = (0..trials.len())
        .filter(|&i| {
            trials[i].status == TrialStatus::Pruned
                && trials[i].last_value().is_some_and(f64::is_finite)
        })
        .collect();
    pruned.sort_by(|&a, &b| {
        let (ta, tb) = (&trials[a], &trials[b]);
        tb.last_step()
            .cmp(&ta.last_step())
            .then(
                ta.last_value()
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&tb.last_value().unwrap_or(f64::INFINITY)),
            )
            .then(ta.id.cmp(&tb.id))
    });
    let ranked: Vec<usize> = done.into_iter().chain(pruned).collect();
    if ranked.is_empty() {
        return (Vec::new(), (0..trials.len()).collect());
    }
    let n_good = ((gamma * ranked.len() as f64).ceil() as usize)
        .clamp(1, 25)
        .min(ranked.len());
    let mut good: Vec<usize> = ranked[..n_good].to_vec();
    let mut bad: Vec<usize> = (0..trials.len()).filter(|i| !good.contains(i)).collect();
    good.sort_by_key(|&i| trials[i].id);
    bad.sort_by_key(|&i| trials[i].id);
    (good, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_spec::trial::SearchSpace;

    fn rec(id: u32, status: &str, obj: Option<f64>, inter: &[(u64, f64)]) -> TrialRecord {
        TrialRecord {
            config: TrialConfig {
                trial_id: id,
                ..TrialConfig::default()
            },
            objective: obj,
            status: status.into(),
            gpu_hours: 1.0,
            intermediate: inter
                .iter()
                .map(|&(step, value)| IntermediateValue { step, value })
                .collect(),
        }
    }

    #[test]
    fn split_places_every_status_explicitly() {
        let space = Space::new(&SearchSpace::default(), &TrialConfig::default());
        let recs = vec![
            rec(1, "completed", Some(0.5), &[]),
            rec(2, "completed", Some(0.3), &[]),
            rec(3, "pruned", None, &[(10, 0.2)]),
            rec(4, "running", None, &[]),
            rec(5, "failed", None, &[]),
            rec(6, "completed", Some(f64::NAN), &[]),
            rec(7, "pruned", None, &[(30, 0.9)]),
        ];
        let t = parse(&recs, &space).unwrap();
        assert_eq!(t[5].status, TrialStatus::Failed);
        // Ranked: 2 (0.3), 1 (0.5), then pruned 7 (deeper), 3. gamma 0.5 of 4 = 2 good.
        let (good, bad) = split(&t, 0.5);
        let ids = |v: &[usize]| v.iter().map(|&i| t[i].id).collect::<Vec<_>>();
        assert_eq!(ids(&good), vec![1, 2]);
        assert_eq!(ids(&bad), vec![3, 4, 5, 6, 7]);
        // gamma 1.0: pruned fill the remaining good slots.
        let (good, _) = split(&t, 1.0);
        assert_eq!(ids(&good), vec![1, 2, 3, 7]);
    }

    #[test]
    fn unknown_status_names_the_field() {
        let space = Space::new(&SearchSpace::default(), &TrialConfig::default());
        let e = parse(&[rec(1, "exploded", None, &[])], &space).unwrap_err();
        assert!(e.to_string().contains("trial_history[0].status"), "{e}");
    }
}

//! Predicted device-hours of a trial from the history: a ridge regression of
//! `ln(gpu_hours)` on the features that drive LoRA training cost (rank,
//! effective batch, adapted modules, QLoRA, length of the run), fitted on
//! the trials that used device time. Slopes are shrunk towards zero, so with
//! one or two trials the prediction is close to their geometric mean, and a
//! pruned trial's cost is scaled up to a full run by the steps it did.

use lora_spec::trial::{PeftMethod, TrialConfig};

/// Ridge penalty on the slopes (small: it only keeps the fit defined with few trials).
const RIDGE: f64 = 0.1;

/// A fitted cost model.
#[derive(Debug, Clone)]
pub struct CostModel {
    beta: Vec<f64>,
    /// Standard deviation of the log residuals (0 with one trial).
    pub log_sd: f64,
    /// Trials it was fitted on.
    pub n: usize,
}

fn features(c: &TrialConfig) -> Vec<f64> {
    let targets = c.expanded_targets().len().max(1) as f64;
    let run = c
        .max_steps
        .map(|s| (s.max(1) as f64 * f64::from(c.batch_size.max(1))).ln())
        .unwrap_or_else(|| c.epochs.max(1e-3).ln());
    vec![
        1.0,
        (f64::from(c.lora_rank.max(1)) / 16.0).log2(),
        (f64::from(c.batch_size.max(1)) / 16.0).log2(),
        (targets / 4.0).log2(),
        if c.method == PeftMethod::Qlora {
            1.0
        } else {
            0.0
        },
        run,
    ]
}

impl CostModel {
    /// Fits on `(config, device-hours of a full run)` pairs; none when there are none.
    pub fn fit(obs: &[(TrialConfig, f64)]) -> Option<Self> {
        let obs: Vec<(Vec<f64>, f64)> = obs
            .iter()
            .filter(|(_, h)| h.is_finite() && *h > 0.0)
            .map(|(c, h)| (features(c), h.ln()))
            .collect();
        if obs.is_empty() {
            return None;
        }
        let p = obs[0].0.len();
        // Normal equations with a ridge on every slope (not the intercept).
        let mut a = vec![vec![0.0; p]; p];
        let mut b = vec![0.0; p];
        for (x, y) in &obs {
            for i in 0..p {
                b[i] += x[i] * y;
                for j in 0..p {
                    a[i][j] += x[i] * x[j];
                }
            }
        }
        for (i, row) in a.iter_mut().enumerate().skip(1) {
            row[i] += RIDGE;
        }
        let beta = solve(a, b)?;
        let resid: Vec<f64> = obs
            .iter()
            .map(|(x, y)| y - x.iter().zip(&beta).map(|(a, b)| a * b).sum::<f64>())
            .collect();
        let log_sd = if resid.len() > 1 {
            (resid.iter().map(|r| r * r).sum::<f64>() / (resid.len() - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Self {
            beta,
            log_sd,
            n: obs.len(),
        })
    }

    /// Predicted device-hours of a full run of `c`.
    pub fn predict(&self, c: &TrialConfig) -> f64 {
        features(c)
            .iter()
            .zip(&self.beta)
            .map(|(a, b)| a * b)
            .sum::<f64>()
            .exp()
    }
}

/// Gaussian elimination with partial pivoting (p is 6).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for r in col + 1..n {
            let f = a[r][col] / a[col][col];
            let pivot_row = a[col].clone();
            for (x, p) in a[r].iter_mut().zip(&pivot_row).skip(col) {
                *x -= f * p;
            }
            b[r] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| a[i][k] * x[k]).sum();
        x[i] = (b[i] - s) / a[i][i];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trial_predicts_its_own_cost_and_more_data_learns_the_slope() {
        let c = TrialConfig::default();
        let m = CostModel::fit(&[(c.clone(), 2.0)]).unwrap();
        assert!((m.predict(&c) - 2.0).abs() < 1e-9);
        // Cost doubles with the epochs: the fit follows.
        let obs: Vec<(TrialConfig, f64)> = [1.0, 2.0, 4.0, 8.0]
            .iter()
            .map(|&e| {
                (
                    TrialConfig {
                        epochs: e,
                        ..c.clone()
                    },
                    0.5 * e,
                )
            })
            .collect();
        let m = CostModel::fit(&obs).unwrap();
        let p = m.predict(&TrialConfig { epochs: 16.0, ..c });
        assert!((p - 8.0).abs() / 8.0 < 0.25, "{p}");
        assert!(CostModel::fit(&[]).is_none());
    }
}

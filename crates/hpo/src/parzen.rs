//! Parzen estimators of TPE (Bergstra et al. 2011; Watanabe 2023), with the
//! kernel choices Optuna's `TPESampler` documents: one truncated-normal
//! kernel per observation on the unit interval plus a prior kernel (centre,
//! σ = range), σ from the gap to the neighbouring observations clipped to
//! `[1/min(100, 1+n), 1]`; categorical kernels that put `1 + w/(n+1)` on the
//! observed choice and `w/(n+1)` elsewhere (Aitchison-Aitken smoothing);
//! mixture weights flat for fewer than 25 observations and ramped up
//! towards the newest beyond.

use rand::Rng;

use crate::space::{Dim, DimKind, cat};

const SQRT_2: f64 = std::f64::consts::SQRT_2;
const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_8;

/// One dimension's kernel of one mixture component.
#[derive(Debug, Clone)]
enum Kernel {
    /// Truncated normal on [0, 1]: mean, sigma, log of the mass inside [0, 1].
    Norm { mu: f64, sigma: f64, log_z: f64 },
    /// Categorical probabilities.
    Cat { logp: Vec<f64>, p: Vec<f64> },
}

/// A mixture of product kernels (one component per observation + the prior).
#[derive(Debug, Clone)]
pub struct Parzen {
    /// `components[i][d]`.
    components: Vec<Vec<Kernel>>,
    log_weights: Vec<f64>,
    weights: Vec<f64>,
}

fn std_normal_cdf(z: f64) -> f64 {
    0.5 * (1.0 + libm::erf(z / SQRT_2))
}

fn norm_kernel(mu: f64, sigma: f64) -> Kernel {
    let mass = std_normal_cdf((1.0 - mu) / sigma) - std_normal_cdf((0.0 - mu) / sigma);
    Kernel::Norm {
        mu,
        sigma,
        log_z: mass.max(1e-300).ln(),
    }
}

impl Kernel {
    fn log_pdf(&self, x: f64) -> f64 {
        match self {
            Kernel::Norm { mu, sigma, log_z } => {
                let z = (x - mu) / sigma;
                -0.5 * z * z - LN_SQRT_2PI - sigma.ln() - log_z
            }
            Kernel::Cat { logp, .. } => {
                if x.is_finite() {
                    logp[cat(x, logp.len())]
                } else {
                    -(logp.len() as f64).ln()
                }
            }
        }
    }

    fn sample<R: Rng>(&self, rng: &mut R) -> f64 {
        match self {
            Kernel::Norm { mu, sigma, .. } => {
                for _ in 0..64 {
                    let v = mu + sigma * gaussian(rng);
                    if (0.0..=1.0).contains(&v) {
                        return v;
                    }
                }
                rng.random::<f64>()
            }
            Kernel::Cat { p, .. } => pick(p, rng) as f64,
        }
    }
}

/// A standard normal draw (Box-Muller).
pub fn gaussian<R: Rng>(rng: &mut R) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// An index drawn with probabilities `p` (which sum to 1).
pub fn pick<R: Rng>(p: &[f64], rng: &mut R) -> usize {
    let u: f64 = rng.random::<f64>();
    let mut acc = 0.0;
    for (i, &w) in p.iter().enumerate() {
        acc += w;
        if u < acc {
            return i;
        }
    }
    p.len().saturating_sub(1)
}

/// Optuna's `default_weights`: flat below 25 observations, else a linear
/// ramp from 1/n for the oldest to 1 for the newest 25 (observations in trial order).
pub fn default_weights(n: usize) -> Vec<f64> {
    if n < 25 {
        return vec![1.0; n];
    }
    let ramp = n - 25;
    let mut w: Vec<f64> = (0..ramp)
        .map(|i| {
            if ramp == 1 {
                1.0 / n as f64
            } else {
                1.0 / n as f64 + (1.0 - 1.0 / n as f64) * i as f64 / (ramp - 1) as f64
            }
        })
        .collect();
    w.extend(std::iter::repeat_n(1.0, 25));
    w
}

/// Bandwidths of the observations of one float dimension: the larger gap to
/// the sorted neighbours (the range ends count as neighbours, except that
/// an edge point takes its inner gap), clipped to `[1/min(100, 1+n), 1]`.
fn bandwidths(values: &[f64]) -> Vec<f64> {
    let n = values.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let sorted: Vec<f64> = order.iter().map(|&i| values[i]).collect();
    let lo_clip = 1.0 / (100.0f64).min(1.0 + (n + 1) as f64);
    let mut sig = vec![1.0; n];
    for (k, &i) in order.iter().enumerate() {
        let left = if k == 0 {
            f64::NAN
        } else {
            sorted[k] - sorted[k - 1]
        };
        let right = if k + 1 == n {
            f64::NAN
        } else {
            sorted[k + 1] - sorted[k]
        };
        let s = match (left.is_nan(), right.is_nan()) {
            (false, false) => left.max(right),
            (true, false) => right,
            (false, true) => left,
            (true, true) => 1.0,
        };
        sig[i] = s.clamp(lo_clip, 1.0);
    }
    sig
}

impl Parzen {
    /// Fits the mixture to `obs` (points in trial order) over `dims`.
    pub fn fit(dims: &[Dim], obs: &[&[f64]], prior_weight: f64) -> Self {
        let n = obs.len();
        let mut components: Vec<Vec<Kernel>> =
            (0..=n).map(|_| Vec::with_capacity(dims.len())).collect();
        for (d, dim) in dims.iter().enumerate() {
            match dim.kind {
                DimKind::Float { .. } => {
                    // Unknown (NaN) values are given the prior kernel's shape.
                    let vals: Vec<f64> =
                        obs.iter().map(|x| x[d]).filter(|v| v.is_finite()).collect();
                    let sig = bandwidths(&vals);
                    let mut k = 0;
                    for (i, x) in obs.iter().enumerate() {
                        if x[d].is_finite() {
                            components[i].push(norm_kernel(x[d], sig[k]));
                            k += 1;
                        } else {
                            components[i].push(norm_kernel(0.5, 1.0));
                        }
                    }
                    components[n].push(norm_kernel(0.5, 1.0));
                }
                DimKind::Cat { n: c, .. } => {
                    let base = prior_weight / (n + 1) as f64;
                    for (i, x) in obs.iter().enumerate() {
                        let mut p = vec![base; c];
                        if x[d].is_finite() {
                            p[cat(x[d], c)] += 1.0;
                        } else {
                            p.iter_mut().for_each(|v| *v += 1.0 / c as f64);
                        }
                        components[i].push(cat_kernel(p));
                    }
                    components[n].push(cat_kernel(vec![1.0; c]));
                }
            }
        }
        let mut w = default_weights(n);
        w.push(prior_weight);
        let total: f64 = w.iter().sum();
        let weights: Vec<f64> = w.iter().map(|v| v / total).collect();
        Self {
            components,
            log_weights: weights.iter().map(|w| w.max(1e-300).ln()).collect(),
            weights,
        }
    }

    /// Joint log density (product kernels).
    pub fn log_pdf(&self, x: &[f64]) -> f64 {
        logsumexp(
            self.components
                .iter()
                .zip(&self.log_weights)
                .map(|(comp, lw)| lw + comp.iter().zip(x).map(|(k, &v)| k.log_pdf(v)).sum::<f64>()),
        )
    }

    /// Marginal log density of dimension `d`.
    pub fn log_pdf_dim(&self, d: usize, v: f64) -> f64 {
        logsumexp(
            self.components
                .iter()
                .zip(&self.log_weights)
                .map(|(comp, lw)| lw + comp[d].log_pdf(v)),
        )
    }

    /// A joint draw: pick a component, then sample each of its kernels.
    pub fn sample<R: Rng>(&self, rng: &mut R) -> Vec<f64> {
        let i = pick(&self.weights, rng);
        self.components[i].iter().map(|k| k.sample(rng)).collect()
    }

    /// A draw of dimension `d` alone (from its marginal mixture).
    pub fn sample_dim<R: Rng>(&self, d: usize, rng: &mut R) -> f64 {
        let i = pick(&self.weights, rng);
        self.components[i][d].sample(rng)
    }
}

fn cat_kernel(p: Vec<f64>) -> Kernel {
    let s: f64 = p.iter().sum();
    let p: Vec<f64> = p.iter().map(|v| v / s).collect();
    Kernel::Cat {
        logp: p.iter().map(|v| v.max(1e-300).ln()).collect(),
        p,
    }
}

fn logsumexp(it: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = it.collect();
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{Dim, Param};
    use rand::SeedableRng;

    fn dims() -> Vec<Dim> {
        vec![
            Dim {
                param: Param::LearningRate,
                kind: DimKind::Float {
                    lo: 1e-5,
                    hi: 1e-3,
                    log: true,
                },
            },
            Dim {
                param: Param::Rank,
                kind: DimKind::Cat {
                    n: 4,
                    ordered: true,
                },
            },
        ]
    }

    #[test]
    fn densities_integrate_to_one() {
        let a = [0.2, 1.0];
        let b = [0.25, 1.0];
        let c = [0.9, 3.0];
        let obs: Vec<&[f64]> = vec![&a, &b, &c];
        let p = Parzen::fit(&dims(), &obs, 1.0);
        // Riemann sum over the float dimension times the sum over the categories.
        let steps = 20_000;
        let mut total = 0.0;
        for k in 0..steps {
            let x = (k as f64 + 0.5) / steps as f64;
            for r in 0..4 {
                total += p.log_pdf(&[x, r as f64]).exp() / steps as f64;
            }
        }
        assert!((total - 1.0).abs() < 1e-3, "{total}");
    }

    #[test]
    fn density_peaks_near_observations_and_samples_follow_it() {
        let a = [0.2, 1.0];
        let b = [0.22, 1.0];
        let obs: Vec<&[f64]> = vec![&a, &b];
        let p = Parzen::fit(&dims(), &obs, 1.0);
        assert!(p.log_pdf(&[0.21, 1.0]) > p.log_pdf(&[0.8, 1.0]));
        assert!(p.log_pdf(&[0.21, 1.0]) > p.log_pdf(&[0.21, 3.0]));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let near = (0..1000)
            .filter(|_| {
                let s = p.sample(&mut rng);
                (s[0] - 0.21).abs() < 0.15 && s[1] == 1.0
            })
            .count();
        // sigma is clipped to 1/min(100, 1 + n_kernels) = 0.25 here; uniform would give ~75.
        assert!(near > 180, "{near}");
    }

    #[test]
    fn weights_ramp_after_25() {
        assert_eq!(default_weights(3), vec![1.0; 3]);
        let w = default_weights(30);
        assert_eq!(w.len(), 30);
        assert!((w[0] - 1.0 / 30.0).abs() < 1e-12);
        assert_eq!(w[29], 1.0);
        assert!(w.windows(2).all(|p| p[0] <= p[1]));
    }
}

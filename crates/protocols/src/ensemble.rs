//! Ensemble (seed 001 §9): member configs that differ on purpose (seed,
//! rank, learning rate, target modules), and normalised merge weights from
//! the members' eval losses (`inverse_loss`, `uniform`, `softmax` with a
//! temperature).

use lora_spec::contracts::protocols::{EnsembleConfig, EnsembleMember};
use lora_spec::experiment::Weighting;
use lora_spec::trial::TrialConfig;

use crate::ProtocolError;

/// Rank multipliers, cycled (period 3).
const RANK_FACTORS: [f64; 3] = [1.0, 0.5, 2.0];
/// Learning-rate multipliers, cycled (period 4; log-spaced around the base).
const LR_FACTORS: [f64; 4] = [1.0, 0.5, 2.0, 0.707];
/// Target sets, cycled (period 3 over base / attention q,v / all-linear; with the
/// base's set first so member 0 is the base config with another seed).
fn target_sets(base: &[String]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = vec![base.to_vec()];
    for s in [
        vec!["q_proj", "v_proj"],
        vec!["all-linear"],
        vec!["q_proj", "k_proj", "v_proj", "o_proj"],
    ] {
        let s: Vec<String> = s.into_iter().map(String::from).collect();
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out.truncate(3);
    out
}

/// Seed 001's `generate_diverse_configs(base, n_members)`: member i gets its
/// own seed, and cycles through ranks (x1, x0.5, x2), learning rates (x1,
/// x0.5, x2, x0.71) and target sets with co-prime periods, so no two of the
/// first 12 members share all three; alpha keeps the base's alpha/rank ratio.
pub fn generate_diverse_configs(
    base: &TrialConfig,
    n_members: u32,
    seed: u64,
) -> Result<Vec<EnsembleConfig>, ProtocolError> {
    if n_members == 0 {
        return Err(ProtocolError::invalid(
            "n_members",
            "must be at least 1",
            Some("for example 3 or 5".into()),
        ));
    }
    let ratio = base.lora_alpha / f64::from(base.lora_rank.max(1));
    let targets = target_sets(&base.target_modules);
    let mut out = Vec::with_capacity(n_members as usize);
    for i in 0..n_members as usize {
        let mut c = base.clone();
        c.trial_id = i as u32 + 1;
        c.seed = lora_hpo_seed(seed, i as u64);
        let rf = RANK_FACTORS[i % RANK_FACTORS.len()];
        c.lora_rank = ((f64::from(base.lora_rank.max(1)) * rf).round() as u32).clamp(2, 512);
        c.lora_alpha = (ratio * f64::from(c.lora_rank) * 100.0).round() / 100.0;
        let lf = LR_FACTORS[i % LR_FACTORS.len()];
        c.learning_rate = base.learning_rate * lf;
        let ts = &targets[i % targets.len()];
        c.target_modules = ts.clone();
        let c = c.normalized();
        if let Some(issue) = c.check().into_iter().next() {
            return Err(ProtocolError::invalid(
                format!("base_config.{}", issue.path),
                issue.message,
                issue.hint,
            ));
        }
        out.push(EnsembleConfig {
            rationale: format!(
                "member {i}: seed {}, rank {} (x{rf}), lr {:.3e} (x{lf}), targets [{}]",
                c.seed,
                c.lora_rank,
                c.learning_rate,
                ts.join(",")
            ),
            trial_config: c,
        });
    }
    Ok(out)
}

/// A member seed from the ensemble seed (SplitMix64, kept in 31 bits for
/// frameworks that take an `int32`).
fn lora_hpo_seed(seed: u64, i: u64) -> u64 {
    lora_hpo::splitmix(seed ^ lora_hpo::splitmix(i)) & 0x7fff_ffff
}

/// Seed 001's `compute_merge_weights(members, method)`: normalised weights
/// (sum 1); failed members (no finite loss) get 0.
///
/// - `inverse_loss`: w ∝ 1 / loss (losses must be positive);
/// - `uniform`: equal;
/// - `softmax`: w ∝ exp(-loss / temperature) (lower temperature: sharper).
pub fn compute_merge_weights(
    members: &[EnsembleMember],
    weighting: Weighting,
    temperature: f64,
) -> Result<Vec<EnsembleMember>, ProtocolError> {
    let ok: Vec<Option<f64>> = members
        .iter()
        .map(|m| m.eval_loss.filter(|l| l.is_finite()))
        .collect();
    let valid: Vec<f64> = ok.iter().flatten().copied().collect();
    if valid.is_empty() {
        return Err(ProtocolError::invalid(
            "members",
            "no member has a finite eval_loss",
            Some("merge weights need at least one evaluated member".into()),
        ));
    }
    let raw: Vec<f64> = match weighting {
        Weighting::Uniform => ok
            .iter()
            .map(|l| if l.is_some() { 1.0 } else { 0.0 })
            .collect(),
        Weighting::InverseLoss => {
            if let Some((i, l)) = ok
                .iter()
                .enumerate()
                .find_map(|(i, l)| l.filter(|l| *l <= 0.0).map(|l| (i, l)))
            {
                return Err(ProtocolError::invalid(
                    format!("members[{i}].eval_loss"),
                    format!("inverse_loss needs positive losses (got {l})"),
                    Some("use softmax or uniform weighting".into()),
                ));
            }
            ok.iter().map(|l| l.map_or(0.0, |l| 1.0 / l)).collect()
        }
        Weighting::Softmax => {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(ProtocolError::invalid(
                    "temperature",
                    format!("must be positive (got {temperature})"),
                    Some("1.0 weighs a loss gap of 1 by e; smaller is sharper".into()),
                ));
            }
            let lo = valid.iter().copied().fold(f64::INFINITY, f64::min);
            ok.iter()
                .map(|l| l.map_or(0.0, |l| (-(l - lo) / temperature).exp()))
                .collect()
        }
    };
    let total: f64 = raw.iter().sum();
    Ok(members
        .iter()
        .zip(raw)
        .map(|(m, w)| EnsembleMember {
            weight: w / total,
            ..m.clone()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u32, l: Option<f64>) -> EnsembleMember {
        EnsembleMember {
            trial_id: id,
            eval_loss: l,
            adapter_path: None,
            weight: 0.0,
        }
    }

    #[test]
    fn members_differ_in_seed_rank_lr_and_targets() {
        let base = TrialConfig::default();
        let c = generate_diverse_configs(&base, 5, 42).unwrap();
        assert_eq!(c.len(), 5);
        let seeds: std::collections::HashSet<u64> = c.iter().map(|x| x.trial_config.seed).collect();
        assert_eq!(seeds.len(), 5);
        assert_eq!(c[0].trial_config.lora_rank, 16);
        assert_eq!(c[1].trial_config.lora_rank, 8);
        assert_eq!(c[2].trial_config.lora_rank, 32);
        assert_eq!(c[2].trial_config.lora_alpha, 64.0);
        assert_eq!(c[1].trial_config.learning_rate, 1e-4);
        assert_ne!(
            c[1].trial_config.target_modules,
            c[0].trial_config.target_modules
        );
        for (i, a) in c.iter().enumerate() {
            for b in &c[i + 1..] {
                assert_ne!(a.trial_config, b.trial_config);
            }
        }
        assert_eq!(generate_diverse_configs(&base, 5, 42).unwrap(), c);
        assert!(generate_diverse_configs(&base, 0, 42).is_err());
    }

    #[test]
    fn weights_are_normalised_for_every_method() {
        let ms = vec![m(1, Some(1.0)), m(2, Some(2.0)), m(3, None)];
        let w = compute_merge_weights(&ms, Weighting::InverseLoss, 1.0).unwrap();
        assert!((w[0].weight - 2.0 / 3.0).abs() < 1e-12 && (w[1].weight - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(w[2].weight, 0.0);
        let w = compute_merge_weights(&ms, Weighting::Uniform, 1.0).unwrap();
        assert_eq!((w[0].weight, w[1].weight, w[2].weight), (0.5, 0.5, 0.0));
        let w = compute_merge_weights(&ms, Weighting::Softmax, 1.0).unwrap();
        let e = (-1.0f64).exp();
        assert!((w[0].weight - 1.0 / (1.0 + e)).abs() < 1e-12);
        let sharp = compute_merge_weights(&ms, Weighting::Softmax, 0.1).unwrap();
        assert!(sharp[0].weight > w[0].weight);
        for w in [&w, &sharp] {
            assert!((w.iter().map(|x| x.weight).sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert!(compute_merge_weights(&ms, Weighting::Softmax, 0.0).is_err());
        assert!(compute_merge_weights(&[m(1, None)], Weighting::Uniform, 1.0).is_err());
        assert!(compute_merge_weights(&[m(1, Some(-1.0))], Weighting::InverseLoss, 1.0).is_err());
    }
}

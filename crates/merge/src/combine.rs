//! Adapter combination with PEFT `add_weighted_adapter` names and semantics
//! (`peft/tuners/lora/model.py`, `peft/utils/merge_utils.py`): linear, cat, svd,
//! ties, dare_linear, dare_ties.
//!
//! The combined adapter gets `r = lora_alpha = new_rank` like PEFT's (so its scale is
//! 1, or sqrt(r) when the first adapter uses rsLoRA, as in PEFT). DARE's random masks
//! come from our own seeded generator: values differ from torch's RNG, the
//! distribution (keep probability `density`, survivors divided by `density`) is PEFT's.

use crate::adapter::{Adapter, LoraModule};
use crate::dtype::DType;
use crate::error::{MergeError, Result};
use crate::gemm::{View, add_product};
use crate::st::{self, TensorSpec};
use lora_spec::contracts::merge::{AdapterCombination, CombinationType};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;

/// A small deterministic generator (splitmix64) for DARE masks.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// PEFT `magnitude_based_pruning`: keep the `int(density·n)` largest |x|.
pub fn magnitude_prune(x: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return x.to_vec();
    }
    let k = (density * x.len() as f64) as usize;
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].abs().total_cmp(&x[a].abs()));
    let mut out = vec![0f32; x.len()];
    for &i in &idx[..k] {
        out[i] = x[i];
    }
    out
}

/// PEFT `random_pruning(rescale=True)`: keep each value with probability `density`, divide survivors by it.
pub fn random_prune(x: &[f32], density: f64, rng: &mut SplitMix) -> Vec<f32> {
    if density >= 1.0 {
        return x.to_vec();
    }
    x.iter()
        .map(|&v| {
            if rng.uniform() < density {
                (v as f64 / density) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// PEFT `ties`-style merge of already-pruned tensors: sign election on the unweighted
/// values (`total` = sign of the sum, `frequency` = sign of the count), then the mean of
/// the weighted values that agree with it.
pub fn disjoint_merge(tensors: &[Vec<f32>], weights: &[f32], frequency: bool) -> Vec<f32> {
    let n = tensors[0].len();
    let sign = |v: f32| -> f32 {
        if v > 0.0 {
            1.0
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    (0..n)
        .map(|j| {
            let mag: f32 = if frequency {
                tensors.iter().map(|t| sign(t[j])).sum()
            } else {
                tensors.iter().map(|t| t[j]).sum()
            };
            let majority = if mag >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0f32, 0f32);
            for (t, w) in tensors.iter().zip(weights) {
                if sign(t[j]) == majority {
                    sum += t[j] * w;
                    count += 1.0;
                }
            }
            sum / count.max(1.0)
        })
        .collect()
}

fn weighted_sum(tensors: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; tensors[0].len()];
    for (t, w) in tensors.iter().zip(weights) {
        for (o, v) in out.iter_mut().zip(t) {
            *o += v * w;
        }
    }
    out
}

fn combine_task(
    ty: CombinationType,
    tensors: &[Vec<f32>],
    weights: &[f32],
    density: f64,
    frequency: bool,
    rng: &mut SplitMix,
) -> Vec<f32> {
    match ty {
        CombinationType::Linear => weighted_sum(tensors, weights),
        CombinationType::Ties => {
            let p: Vec<Vec<f32>> = tensors
                .iter()
                .map(|t| magnitude_prune(t, density))
                .collect();
            disjoint_merge(&p, weights, frequency)
        }
        CombinationType::DareLinear => {
            let p: Vec<Vec<f32>> = tensors
                .iter()
                .map(|t| random_prune(t, density, rng))
                .collect();
            weighted_sum(&p, weights)
        }
        CombinationType::DareTies => {
            let p: Vec<Vec<f32>> = tensors
                .iter()
                .map(|t| random_prune(t, density, rng))
                .collect();
            disjoint_merge(&p, weights, frequency)
        }
        CombinationType::Cat | CombinationType::Svd => weighted_sum(tensors, weights),
    }
}

/// Thin QR by modified Gram-Schmidt of a row-major `m × k` matrix (m ≥ k): returns
/// (Q `m × k` row-major, R `k × k` row-major).
fn qr(a: &[f32], m: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut q: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let mut r = vec![0f64; k * k];
    for j in 0..k {
        for i in 0..j {
            let dot: f64 = (0..m).map(|t| q[t * k + i] * q[t * k + j]).sum();
            r[i * k + j] = dot;
            for t in 0..m {
                q[t * k + j] -= dot * q[t * k + i];
            }
        }
        let norm = (0..m)
            .map(|t| q[t * k + j] * q[t * k + j])
            .sum::<f64>()
            .sqrt();
        r[j * k + j] = norm;
        if norm > 0.0 {
            for t in 0..m {
                q[t * k + j] /= norm;
            }
        }
    }
    (q, r)
}

/// One-sided Jacobi SVD of a square `n × n` row-major matrix: (U, S, V) with
/// `M = U·diag(S)·Vᵀ`, singular values descending.
fn jacobi_svd(mat: &[f64], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut u = mat.to_vec(); // columns get orthogonalised
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut off = 0f64;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0f64, 0f64, 0f64);
                for i in 0..n {
                    alpha += u[i * n + p] * u[i * n + p];
                    beta += u[i * n + q] * u[i * n + q];
                    gamma += u[i * n + p] * u[i * n + q];
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                off = off.max(gamma.abs() / (alpha * beta).sqrt());
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..n {
                    let (a, b) = (u[i * n + p], u[i * n + q]);
                    u[i * n + p] = c * a - s * b;
                    u[i * n + q] = s * a + c * b;
                    let (a, b) = (v[i * n + p], v[i * n + q]);
                    v[i * n + p] = c * a - s * b;
                    v[i * n + q] = s * a + c * b;
                }
            }
        }
        if off < 1e-14 {
            break;
        }
    }
    let mut s: Vec<f64> = (0..n)
        .map(|j| {
            (0..n)
                .map(|i| u[i * n + j] * u[i * n + j])
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    for j in 0..n {
        if s[j] > 0.0 {
            for i in 0..n {
                u[i * n + j] /= s[j];
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    let pick = |m: &[f64]| -> Vec<f64> {
        let mut out = vec![0f64; n * n];
        for i in 0..n {
            for (jn, &jo) in order.iter().enumerate() {
                out[i * n + jn] = m[i * n + jo];
            }
        }
        out
    };
    let (u2, v2) = (pick(&u), pick(&v));
    s = order.iter().map(|&j| s[j]).collect();
    (u2, s, v2)
}

/// Truncated SVD of the low-rank product `B (out × R) · A (R × in)`: returns
/// (`U·diag(S)` `out × k`, `Vh` `k × in`), exactly what PEFT's `svd` combination keeps.
pub fn low_rank_svd(
    b: &[f32],
    a: &[f32],
    out: usize,
    r: usize,
    inn: usize,
    k: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (qb, rb) = qr(b, out, r);
    let at: Vec<f32> = (0..inn * r).map(|i| a[(i % r) * inn + i / r]).collect(); // Aᵀ, in × r
    let (qa, ra) = qr(&at, inn, r);
    // M = Rb · Raᵀ
    let mut m = vec![0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            m[i * r + j] = (0..r).map(|t| rb[i * r + t] * ra[j * r + t]).sum();
        }
    }
    let (um, s, vm) = jacobi_svd(&m, r);
    let k = k.min(r);
    let mut new_b = vec![0f32; out * k];
    for i in 0..out {
        for j in 0..k {
            new_b[i * k + j] =
                ((0..r).map(|t| qb[i * r + t] * um[t * r + j]).sum::<f64>() * s[j]) as f32;
        }
    }
    let mut new_a = vec![0f32; k * inn];
    for j in 0..k {
        for i in 0..inn {
            new_a[j * inn + i] = (0..r).map(|t| qa[i * r + t] * vm[t * r + j]).sum::<f64>() as f32;
        }
    }
    (new_b, new_a)
}

fn module_map(ad: &Adapter) -> BTreeMap<&str, &LoraModule> {
    ad.modules.iter().map(|m| (m.module.as_str(), m)).collect()
}

/// What a combination wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CombineReport {
    /// Rank of the combined adapter.
    pub rank: usize,
    /// Modules written.
    pub modules: usize,
}

/// Combines adapters as PEFT `add_weighted_adapter` does and writes the result as a
/// PEFT adapter folder `out` (adapter_config.json + adapter_model.safetensors).
pub fn combine(
    adapters: &[Adapter],
    spec: &AdapterCombination,
    out: &Path,
) -> Result<CombineReport> {
    if adapters.is_empty() || adapters.len() != spec.weights.len() {
        return Err(MergeError::invalid(
            "combination.weights",
            format!(
                "{} adapters but {} weights",
                adapters.len(),
                spec.weights.len()
            ),
            "give one weight per adapter",
        ));
    }
    if let Some(a) = adapters
        .iter()
        .find(|a| a.has_dora() || !a.replacements.is_empty())
    {
        return Err(MergeError::unsupported(
            format!(
                "{}: DoRA or modules_to_save adapters cannot be combined",
                a.dir.display()
            ),
            "merge such adapters one at a time instead",
        ));
    }
    let frequency = match spec.majority_sign_method.as_str() {
        "total" => false,
        "frequency" => true,
        other => {
            return Err(MergeError::invalid(
                "combination.majority_sign_method",
                format!("`{other}` is not a sign method"),
                "use total or frequency",
            ));
        }
    };
    let density = spec.density.unwrap_or(1.0);
    let needs_density = matches!(
        spec.combination_type,
        CombinationType::Ties | CombinationType::DareLinear | CombinationType::DareTies
    );
    if needs_density && (spec.density.is_none() || !(density > 0.0 && density <= 1.0)) {
        return Err(MergeError::invalid(
            "combination.density",
            format!("{:?} needs a density in (0, 1]", spec.combination_type),
            "for example density: 0.5",
        ));
    }
    // PEFT: a single adapter is always combined linearly.
    let ty = if adapters.len() == 1 {
        CombinationType::Linear
    } else {
        spec.combination_type
    };
    let ranks: Vec<usize> = adapters
        .iter()
        .map(|a| a.modules.iter().map(|m| m.rank).max().unwrap_or(0))
        .collect();
    let new_rank = match ty {
        CombinationType::Cat => ranks.iter().sum(),
        CombinationType::Svd => spec
            .svd_rank
            .unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0)),
        _ => {
            if ranks.iter().any(|&r| r != ranks[0])
                || adapters
                    .iter()
                    .any(|a| a.modules.iter().any(|m| m.rank != ranks[0]))
            {
                return Err(MergeError::invalid(
                    "combination.combination_type",
                    format!("{ty:?} needs every adapter to have the same r (got {ranks:?})"),
                    "use cat or svd for adapters of different ranks",
                ));
            }
            ranks[0]
        }
    };
    let maps: Vec<BTreeMap<&str, &LoraModule>> = adapters.iter().map(module_map).collect();
    let mut names: Vec<&str> = maps.iter().flat_map(|m| m.keys().copied()).collect();
    names.sort_unstable();
    names.dedup();
    let mut rng = SplitMix::new(spec.seed);
    let mut tensors: Vec<(TensorSpec, Vec<f32>)> = Vec::new();
    let mut targets = std::collections::BTreeSet::new();
    for name in &names {
        let present: Vec<(usize, &LoraModule)> = maps
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.get(name).map(|x| (i, *x)))
            .collect();
        let first = present[0].1;
        if present.iter().any(|(_, m)| m.embedding) {
            return Err(MergeError::unsupported(
                format!(
                    "module `{name}` is an embedding adapter; combining those is not supported here"
                ),
                "combine adapters of linear projections",
            ));
        }
        let (a0, ash) = adapters[present[0].0].f32(&first.a)?;
        let _ = a0;
        let inn = ash[1];
        let out_dim = adapters[present[0].0]
            .tensors
            .get(&first.b)
            .map(|e| e.shape[0])
            .unwrap_or(0);
        let mut a_new = vec![0f32; new_rank * inn];
        let mut b_new = vec![0f32; out_dim * new_rank];
        match ty {
            CombinationType::Cat => {
                let mut off = 0;
                for (i, m) in &present {
                    let (a, _) = adapters[*i].f32(&m.a)?;
                    let (b, _) = adapters[*i].f32(&m.b)?;
                    let f = (spec.weights[*i] * m.scale) as f32;
                    for rr in 0..m.rank {
                        for c in 0..inn {
                            a_new[(off + rr) * inn + c] = a[rr * inn + c] * f;
                        }
                        for o in 0..out_dim {
                            b_new[o * new_rank + off + rr] = b[o * m.rank + rr];
                        }
                    }
                    off += m.rank;
                }
            }
            CombinationType::Svd => {
                // Exact Σ w·s·B·A as a rank-R product, then its truncated SVD.
                let rt: usize = present.iter().map(|(_, m)| m.rank).sum();
                let mut bc = vec![0f32; out_dim * rt];
                let mut ac = vec![0f32; rt * inn];
                let mut off = 0;
                for (i, m) in &present {
                    let (a, _) = adapters[*i].f32(&m.a)?;
                    let (b, _) = adapters[*i].f32(&m.b)?;
                    let f = (spec.weights[*i] * m.scale) as f32;
                    for rr in 0..m.rank {
                        ac[(off + rr) * inn..(off + rr + 1) * inn]
                            .copy_from_slice(&a[rr * inn..(rr + 1) * inn]);
                        for o in 0..out_dim {
                            bc[o * rt + off + rr] = b[o * m.rank + rr] * f;
                        }
                    }
                    off += m.rank;
                }
                let k = new_rank.min(rt);
                let (nb, na) = low_rank_svd(&bc, &ac, out_dim, rt, inn, k);
                for o in 0..out_dim {
                    b_new[o * new_rank..o * new_rank + k].copy_from_slice(&nb[o * k..(o + 1) * k]);
                }
                a_new[..k * inn].copy_from_slice(&na);
            }
            _ => {
                let mut wa = Vec::new();
                let mut wb = Vec::new();
                let mut la = Vec::new();
                let mut lb = Vec::new();
                for (i, m) in &present {
                    let ws = spec.weights[*i] * m.scale;
                    let sign = if ws >= 0.0 { 1.0 } else { -1.0 };
                    wa.push((ws.abs().sqrt() * sign) as f32);
                    wb.push(ws.abs().sqrt() as f32);
                    la.push(adapters[*i].f32(&m.a)?.0);
                    lb.push(adapters[*i].f32(&m.b)?.0);
                }
                a_new = combine_task(ty, &la, &wa, density, frequency, &mut rng);
                b_new = combine_task(ty, &lb, &wb, density, frequency, &mut rng);
            }
        }
        let prefix = format!("{}{}", crate::adapter::PEFT_PREFIX, name);
        tensors.push((
            TensorSpec {
                name: format!("{prefix}.lora_A.weight"),
                dtype: DType::F32,
                shape: vec![new_rank, inn],
            },
            a_new,
        ));
        tensors.push((
            TensorSpec {
                name: format!("{prefix}.lora_B.weight"),
                dtype: DType::F32,
                shape: vec![out_dim, new_rank],
            },
            b_new,
        ));
        targets.insert(name.rsplit('.').next().unwrap_or(name).to_string());
    }
    let mut cfg = adapters[0].config.raw.clone();
    if let Some(o) = cfg.as_object_mut() {
        o.insert("r".into(), json!(new_rank));
        o.insert("lora_alpha".into(), json!(new_rank));
        o.insert("alpha_pattern".into(), json!({}));
        o.insert("rank_pattern".into(), json!({}));
        o.insert(
            "target_modules".into(),
            Value::from(targets.into_iter().collect::<Vec<_>>()),
        );
    }
    if out.exists() {
        return Err(MergeError::invalid(
            "adapter_path",
            format!("{} already exists", out.display()),
            "the combined adapter is written to a new folder",
        ));
    }
    let tmp = lora_skill::fs::temp_path_for(out);
    std::fs::create_dir_all(&tmp).map_err(|e| MergeError::io(&tmp, e))?;
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let res = (|| {
        let p = tmp.join("adapter_config.json");
        lora_skill::fs::write_json_atomic(&p, &cfg).map_err(|e| MergeError::io(&p, e))?;
        st::write_sharded(&tmp, &specs, u64::MAX, &mut |i| {
            Ok(crate::dtype::from_f32(&tensors[i].1, DType::F32))
        })?;
        let (from, to) = (
            tmp.join("model.safetensors"),
            tmp.join("adapter_model.safetensors"),
        );
        std::fs::rename(&from, &to).map_err(|e| MergeError::io(&to, e))
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    lora_skill::fs::publish_dir(&tmp, out).map_err(|e| MergeError::io(out, e))?;
    Ok(CombineReport {
        rank: new_rank,
        modules: names.len(),
    })
}

/// The dense delta `scale·B·A` of module `name` in an adapter (for checks).
pub fn dense_delta(ad: &Adapter, name: &str) -> Result<(Vec<f32>, usize, usize)> {
    let m = ad
        .modules
        .iter()
        .find(|m| m.module == name)
        .ok_or_else(|| MergeError::NotFound {
            message: format!("module `{name}` not in {}", ad.dir.display()),
            file: None,
            hint: None,
        })?;
    let (a, ash) = ad.f32(&m.a)?;
    let (b, bsh) = ad.f32(&m.b)?;
    let mut d = vec![0f32; bsh[0] * ash[1]];
    add_product(
        &mut d,
        m.scale as f32,
        View::row_major(&b, bsh[0], m.rank),
        View::row_major(&a, m.rank, ash[1]),
    )?;
    Ok((d, bsh[0], ash[1]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn svd_of_a_low_rank_product_reconstructs_it() {
        let (out, r, inn) = (12, 4, 9);
        let b: Vec<f32> = (0..out * r)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let a: Vec<f32> = (0..r * inn)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let mut full = vec![0f32; out * inn];
        add_product(
            &mut full,
            1.0,
            View::row_major(&b, out, r),
            View::row_major(&a, r, inn),
        )
        .unwrap();
        let (nb, na) = low_rank_svd(&b, &a, out, r, inn, r);
        let mut rec = vec![0f32; out * inn];
        add_product(
            &mut rec,
            1.0,
            View::row_major(&nb, out, r),
            View::row_major(&na, r, inn),
        )
        .unwrap();
        let err = full
            .iter()
            .zip(&rec)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err < 1e-4, "{err}");
        // rows of Vh are orthonormal
        for i in 0..r {
            let n: f32 = (0..inn).map(|c| na[i * inn + c] * na[i * inn + c]).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn pruning_and_sign_election_follow_peft() {
        let x = [0.1f32, -0.5, 0.3, -0.05];
        assert_eq!(magnitude_prune(&x, 0.5), vec![0.0, -0.5, 0.3, 0.0]);
        let t = vec![vec![1.0f32, -2.0, 0.0], vec![-3.0, -1.0, 2.0]];
        // total: column 0 sum -2 -> majority -1 -> only -3 counts; column 1 both negative; column 2 only 2
        assert_eq!(
            disjoint_merge(&t, &[1.0, 0.5], false),
            vec![-1.5, (-2.0 - 0.5) / 2.0, 1.0]
        );
        // frequency: column 0 signs +1 -1 -> 0 >= 0 -> majority +1
        assert_eq!(disjoint_merge(&t, &[1.0, 0.5], true)[0], 1.0);
        let mut rng = SplitMix::new(7);
        let big = vec![1.0f32; 20000];
        let p = random_prune(&big, 0.3, &mut rng);
        let kept = p.iter().filter(|v| **v != 0.0).count() as f64 / 20000.0;
        assert!((kept - 0.3).abs() < 0.02, "{kept}");
        assert!(p.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.3).abs() < 1e-5));
    }
}

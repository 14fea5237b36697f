//! The search space as the samplers see it: a list of dimensions, each a
//! float in `[0, 1]` (log-scaled for the learning rate) or a categorical
//! index, with the encoding of a `TrialConfig` into that unit cube and the
//! decoding of a point back into a `TrialConfig` built on the base config.

use lora_spec::trial::{PeftMethod, SearchSpace, TrialConfig};

/// What a dimension is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DimKind {
    /// A float mapped to `[0, 1]`: `lo..hi`, log-scaled when `log`.
    Float {
        /// Lower end (in natural units).
        lo: f64,
        /// Upper end.
        hi: f64,
        /// Whether the mapping is logarithmic.
        log: bool,
    },
    /// One of `n` choices (stored as the index).
    Cat {
        /// Number of choices.
        n: usize,
        /// Whether the choices are ordered (ranks, batch sizes): perturbations move to a neighbour.
        ordered: bool,
    },
}

/// The searched hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Param {
    /// `learning_rate` (log-uniform).
    LearningRate,
    /// `lora_rank` (categorical).
    Rank,
    /// `lora_alpha / lora_rank`.
    AlphaRatio,
    /// `lora_dropout`.
    Dropout,
    /// `batch_size` (categorical).
    BatchSize,
    /// `warmup_ratio`.
    Warmup,
    /// `target_modules` (categorical over the sets).
    Targets,
    /// `method` (categorical).
    Method,
}

impl Param {
    /// The `TrialConfig` field name.
    pub fn name(self) -> &'static str {
        match self {
            Self::LearningRate => "learning_rate",
            Self::Rank => "lora_rank",
            Self::AlphaRatio => "alpha_ratio",
            Self::Dropout => "lora_dropout",
            Self::BatchSize => "batch_size",
            Self::Warmup => "warmup_ratio",
            Self::Targets => "target_modules",
            Self::Method => "method",
        }
    }
}

/// One searched dimension.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dim {
    /// Which hyper-parameter.
    pub param: Param,
    /// Its kind.
    pub kind: DimKind,
}

/// A point in the unit cube: floats in `[0, 1]`, categoricals as indices
/// (`NaN` where a history config has a value outside the choices).
pub type Point = Vec<f64>;

/// The encoded search space.
#[derive(Debug, Clone)]
pub struct Space {
    /// Dimensions that vary (fixed ones are not searched).
    pub dims: Vec<Dim>,
    space: SearchSpace,
    base: TrialConfig,
}

impl Space {
    /// Encodes `space` on top of `base` (the space must already be checked).
    pub fn new(space: &SearchSpace, base: &TrialConfig) -> Self {
        let mut dims = Vec::new();
        let float = |lo: f64, hi: f64, log: bool| DimKind::Float { lo, hi, log };
        if space.lr_max > space.lr_min {
            dims.push(Dim {
                param: Param::LearningRate,
                kind: float(space.lr_min, space.lr_max, true),
            });
        }
        if space.rank_choices.len() > 1 {
            dims.push(Dim {
                param: Param::Rank,
                kind: DimKind::Cat {
                    n: space.rank_choices.len(),
                    ordered: true,
                },
            });
        }
        if space.alpha_ratio_max > space.alpha_ratio_min {
            dims.push(Dim {
                param: Param::AlphaRatio,
                kind: float(space.alpha_ratio_min, space.alpha_ratio_max, false),
            });
        }
        if space.dropout_max > space.dropout_min {
            dims.push(Dim {
                param: Param::Dropout,
                kind: float(space.dropout_min, space.dropout_max, false),
            });
        }
        if space.batch_size_choices.len() > 1 {
            dims.push(Dim {
                param: Param::BatchSize,
                kind: DimKind::Cat {
                    n: space.batch_size_choices.len(),
                    ordered: true,
                },
            });
        }
        if space.warmup_ratio_max > space.warmup_ratio_min {
            dims.push(Dim {
                param: Param::Warmup,
                kind: float(space.warmup_ratio_min, space.warmup_ratio_max, false),
            });
        }
        if space.target_module_sets.len() > 1 {
            dims.push(Dim {
                param: Param::Targets,
                kind: DimKind::Cat {
                    n: space.target_module_sets.len(),
                    ordered: false,
                },
            });
        }
        if space.methods.len() > 1 {
            dims.push(Dim {
                param: Param::Method,
                kind: DimKind::Cat {
                    n: space.methods.len(),
                    ordered: false,
                },
            });
        }
        Self {
            dims,
            space: space.clone(),
            base: base.clone(),
        }
    }

    /// Number of searched dimensions.
    pub fn len(&self) -> usize {
        self.dims.len()
    }

    /// Whether nothing is searched (every range is a single value).
    pub fn is_empty(&self) -> bool {
        self.dims.is_empty()
    }

    /// The number of distinct configurations when every dimension is
    /// categorical (none when a float dimension makes it practically infinite).
    pub fn finite_size(&self) -> Option<u64> {
        let mut n: u64 = 1;
        for d in &self.dims {
            match d.kind {
                DimKind::Cat { n: c, .. } => n = n.saturating_mul(c as u64),
                DimKind::Float { .. } => return None,
            }
        }
        Some(n)
    }

    /// Encodes a config (values outside a float range are clamped; a
    /// categorical value that is not a choice becomes `NaN`, i.e. unknown).
    pub fn encode(&self, c: &TrialConfig) -> Point {
        self.dims
            .iter()
            .map(|d| match (d.param, d.kind) {
                (Param::LearningRate, DimKind::Float { lo, hi, log }) => {
                    to_unit(c.learning_rate, lo, hi, log)
                }
                (Param::AlphaRatio, DimKind::Float { lo, hi, log }) => {
                    to_unit(c.lora_alpha / f64::from(c.lora_rank.max(1)), lo, hi, log)
                }
                (Param::Dropout, DimKind::Float { lo, hi, log }) => {
                    to_unit(c.lora_dropout, lo, hi, log)
                }
                (Param::Warmup, DimKind::Float { lo, hi, log }) => {
                    to_unit(c.warmup_ratio, lo, hi, log)
                }
                (Param::Rank, _) => index_of(&self.space.rank_choices, &c.lora_rank),
                (Param::BatchSize, _) => index_of(&self.space.batch_size_choices, &c.batch_size),
                (Param::Targets, _) => {
                    let mut want = c.target_modules.clone();
                    want.sort();
                    self.space
                        .target_module_sets
                        .iter()
                        .position(|s| {
                            let mut s = s.clone();
                            s.sort();
                            s == want
                        })
                        .map_or(f64::NAN, |i| i as f64)
                }
                (Param::Method, _) => index_of(&self.space.methods, &c.method),
                _ => f64::NAN,
            })
            .collect()
    }

    /// Builds the config of a point on top of the base config (trial id and
    /// seed are the caller's). Floats are rounded to readable precision.
    pub fn decode(&self, x: &[f64]) -> TrialConfig {
        let s = &self.space;
        let mut c = self.base.clone();
        // Fixed dimensions take the space's single value when it has one.
        if s.lr_max <= s.lr_min {
            c.learning_rate = s.lr_min;
        }
        if s.rank_choices.len() == 1 {
            c.lora_rank = s.rank_choices[0];
        }
        let mut ratio = s.alpha_ratio_min;
        if s.dropout_max <= s.dropout_min {
            c.lora_dropout = s.dropout_min;
        }
        if s.batch_size_choices.len() == 1 {
            c.batch_size = s.batch_size_choices[0];
        }
        if s.warmup_ratio_max <= s.warmup_ratio_min {
            c.warmup_ratio = s.warmup_ratio_min;
        }
        if s.target_module_sets.len() == 1 {
            c.target_modules = s.target_module_sets[0].clone();
        }
        if s.methods.len() == 1 {
            c.method = s.methods[0];
        }
        for (d, &v) in self.dims.iter().zip(x) {
            match (d.param, d.kind) {
                (Param::LearningRate, DimKind::Float { lo, hi, log }) => {
                    c.learning_rate = round_sig(from_unit(v, lo, hi, log), 3).clamp(lo, hi);
                }
                (Param::AlphaRatio, DimKind::Float { lo, hi, log }) => {
                    ratio = from_unit(v, lo, hi, log)
                }
                (Param::Dropout, DimKind::Float { lo, hi, log }) => {
                    c.lora_dropout = round_dec(from_unit(v, lo, hi, log), 3).clamp(lo, hi);
                }
                (Param::Warmup, DimKind::Float { lo, hi, log }) => {
                    c.warmup_ratio = round_dec(from_unit(v, lo, hi, log), 3).clamp(lo, hi);
                }
                (Param::Rank, DimKind::Cat { n, .. }) => c.lora_rank = s.rank_choices[cat(v, n)],
                (Param::BatchSize, DimKind::Cat { n, .. }) => {
                    c.batch_size = s.batch_size_choices[cat(v, n)]
                }
                (Param::Targets, DimKind::Cat { n, .. }) => {
                    c.target_modules = s.target_module_sets[cat(v, n)].clone();
                }
                (Param::Method, DimKind::Cat { n, .. }) => c.method = s.methods[cat(v, n)],
                _ => {}
            }
        }
        c.lora_alpha = round_dec(ratio * f64::from(c.lora_rank), 2).max(0.01);
        match c.method {
            PeftMethod::Qlora => {
                if c.quantization_bits.is_none() {
                    c.quantization_bits = Some(4);
                }
            }
            _ => c.quantization_bits = None,
        }
        if c.micro_batch_size > c.batch_size
            || !c.batch_size.is_multiple_of(c.micro_batch_size.max(1))
        {
            let b = c.batch_size.max(1);
            let m = c.micro_batch_size.clamp(1, b);
            c.micro_batch_size = (1..=m).rev().find(|d| b.is_multiple_of(*d)).unwrap_or(1);
        }
        c.gradient_accumulation = 0;
        c.normalized()
    }

    /// The identity of a config for "already tried" checks: the searched
    /// fields at the precision `decode` rounds to.
    pub fn key(&self, c: &TrialConfig) -> String {
        let mut t = c.target_modules.clone();
        t.sort();
        format!(
            "{}|{}|{:.2}|{:.3}|{}|{:.3}|{}|{}",
            round_sig(c.learning_rate, 3),
            c.lora_rank,
            c.lora_alpha,
            c.lora_dropout,
            c.batch_size,
            c.warmup_ratio,
            t.join(","),
            c.method.as_str()
        )
    }

    /// Readable summary of the searched values of a config.
    pub fn describe(&self, c: &TrialConfig) -> String {
        format!(
            "lr={:.3e} r={} alpha={} dropout={} batch={} warmup={} targets=[{}]{}",
            c.learning_rate,
            c.lora_rank,
            c.lora_alpha,
            c.lora_dropout,
            c.batch_size,
            c.warmup_ratio,
            c.target_modules.join(","),
            if self.space.methods.len() > 1 {
                format!(" method={}", c.method.as_str())
            } else {
                String::new()
            }
        )
    }

    /// The rank choices (arms of UCB).
    pub fn rank_choices(&self) -> &[u32] {
        &self.space.rank_choices
    }
}

fn index_of<T: PartialEq>(choices: &[T], v: &T) -> f64 {
    choices
        .iter()
        .position(|c| c == v)
        .map_or(f64::NAN, |i| i as f64)
}

/// A categorical index from a stored value.
pub fn cat(v: f64, n: usize) -> usize {
    if v.is_finite() && v >= 0.0 {
        (v as usize).min(n.saturating_sub(1))
    } else {
        0
    }
}

/// Natural units to `[0, 1]`.
pub fn to_unit(v: f64, lo: f64, hi: f64, log: bool) -> f64 {
    let u = if log {
        (v.max(f64::MIN_POSITIVE).ln() - lo.ln()) / (hi.ln() - lo.ln())
    } else {
        (v - lo) / (hi - lo)
    };
    if u.is_finite() {
        u.clamp(0.0, 1.0)
    } else {
        f64::NAN
    }
}

/// `[0, 1]` to natural units.
pub fn from_unit(u: f64, lo: f64, hi: f64, log: bool) -> f64 {
    let u = u.clamp(0.0, 1.0);
    if log {
        (lo.ln() + u * (hi.ln() - lo.ln())).exp()
    } else {
        lo + u * (hi - lo)
    }
}

/// Rounds to `sig` significant digits.
pub fn round_sig(v: f64, sig: i32) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let mag = v.abs().log10().floor() as i32;
    let f = 10f64.powi(sig - 1 - mag);
    (v * f).round() / f
}

/// Rounds to `dec` decimals.
pub fn round_dec(v: f64, dec: i32) -> f64 {
    let f = 10f64.powi(dec);
    (v * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_the_searched_values() {
        let space = Space::new(&SearchSpace::default(), &TrialConfig::default());
        assert_eq!(space.len(), 7);
        let x = vec![0.5, 2.0, 0.5, 0.3, 1.0, 0.7, 2.0];
        let c = space.decode(&x);
        assert_eq!(c.lora_rank, 32);
        assert_eq!(c.batch_size, 16);
        assert_eq!(c.target_modules, vec!["all-linear".to_string()]);
        assert!((c.lora_alpha - 48.0).abs() < 1e-9);
        let back = space.encode(&c);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() < 0.01, "{x:?} vs {back:?}");
        }
        assert!(c.check().is_empty(), "{:?}", c.check());
    }

    #[test]
    fn unknown_categorical_values_are_nan_and_fixed_dims_are_not_searched() {
        let s = SearchSpace {
            rank_choices: vec![16],
            lr_min: 1e-4,
            lr_max: 1e-4,
            ..SearchSpace::default()
        };
        let space = Space::new(&s, &TrialConfig::default());
        assert!(
            space
                .dims
                .iter()
                .all(|d| d.param != Param::Rank && d.param != Param::LearningRate)
        );
        let c = TrialConfig {
            batch_size: 7,
            ..TrialConfig::default()
        };
        let x = space.encode(&c);
        let bi = space
            .dims
            .iter()
            .position(|d| d.param == Param::BatchSize)
            .unwrap();
        assert!(x[bi].is_nan());
        let d = space.decode(&x);
        assert_eq!(d.lora_rank, 16);
        assert_eq!(d.learning_rate, 1e-4);
    }
}

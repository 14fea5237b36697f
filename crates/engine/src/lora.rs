//! LoRA adapters with PEFT semantics and PEFT's file format.
//!
//! - [`LoraLayer`]: one adapter on one linear projection,
//!   `y = base(x) + scale · B(A(dropout(x)))`, `scale = alpha / r` (or
//!   `alpha / sqrt(r)` for rsLoRA). The base output is never scaled.
//! - [`LoraSpec`] + [`attach`]: put fresh adapters on the projections a
//!   target list names (`q_proj`, ..., or `all-linear`), initialised as PEFT
//!   does (`A` Kaiming-uniform with `a = sqrt(5)`, i.e. `U(±1/sqrt(in))`; `B`
//!   zero), so a fresh adapter leaves the logits unchanged. Only `A` and `B`
//!   require gradients: the frozen base keeps no gradient buffers.
//! - [`save_peft`] / [`load_peft`]: `adapter_config.json` +
//!   `adapter_model.safetensors` with PEFT's key names
//!   (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so
//!   `PeftModel.from_pretrained` loads what we write and we load what PEFT writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{EngineError, Result};
use crate::model::LlamaModel;

/// PEFT's adapter config file name.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file name.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix of every PEFT tensor key of a causal LM.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// One LoRA adapter: `a` is `[r, in_features]`, `b` is `[out_features, r]`.
#[derive(Debug)]
pub struct LoraLayer {
    /// Down projection `A`, shape `[r, in_features]`.
    pub a: Tensor,
    /// Up projection `B`, shape `[out_features, r]`.
    pub b: Tensor,
    /// Multiplier of the adapter's output (`alpha / r`).
    pub scale: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f64,
    /// When false the adapter contributes nothing (the base model runs alone).
    pub enabled: bool,
}

impl LoraLayer {
    /// A new, enabled adapter.
    pub fn new(a: Tensor, b: Tensor, scale: f64, dropout: f64) -> Self {
        Self {
            a,
            b,
            scale,
            dropout,
            enabled: true,
        }
    }

    /// Rank `r`.
    pub fn rank(&self) -> i64 {
        self.a.size().first().copied().unwrap_or(0)
    }

    /// The adapter's contribution `scale · B(A(dropout(x)))`, or `None` when disabled.
    /// Dropout applies only when `train` is true. The scale is applied on the
    /// rank-`r` intermediate (cheaper than on the output, same value); inputs of
    /// another floating kind than the adapter are cast to it and back.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Option<Tensor> {
        if !self.enabled {
            return None;
        }
        let kind = x.kind();
        let out = self.down(x, train).linear::<&Tensor>(&self.b, None);
        Some(if out.kind() == kind {
            out
        } else {
            out.to_kind(kind)
        })
    }

    /// `base + scale · B(A(dropout(x)))` with the up-projection and the sum
    /// in one GEMM (`addmm`, C = base + h·Bᵀ): one pass over the output fewer
    /// than adding [`Self::forward_t`]'s result. `base` is the frozen
    /// projection's output for `x`; inputs of another kind than the adapter
    /// take the separate path.
    pub fn add_to(&self, base: Tensor, x: &Tensor, train: bool) -> Tensor {
        if !self.enabled {
            return base;
        }
        if x.kind() != self.a.kind() || base.kind() != self.a.kind() {
            return match self.forward_t(x, train) {
                Some(d) => base + d,
                None => base,
            };
        }
        let h = self.down(x, train);
        let shape = base.size();
        let out = *shape.last().unwrap_or(&0);
        base.reshape([-1, out])
            .addmm(&h.reshape([-1, self.rank()]), &self.b.tr())
            .reshape(shape)
    }

    /// The scaled rank-`r` intermediate `scale · A(dropout(x))`, in the
    /// adapter's kind (dropout only when `train`).
    fn down(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = if x.kind() == self.a.kind() {
            x.shallow_clone()
        } else {
            x.to_kind(self.a.kind())
        };
        if train && self.dropout > 0.0 {
            h = h.dropout(self.dropout, true);
        }
        h.linear::<&Tensor>(&self.a, None) * self.scale
    }

    /// The weight delta `scale · B A` (`[out, in]`), for merging.
    pub fn delta_weight(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scale
    }
}

/// Which projections get adapters, and how they are scaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Rank `r`.
    pub r: i64,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Dropout on the adapter input (training only).
    pub dropout: f64,
    /// Rank-stabilised scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Module names matched as PEFT does (`name == t` or ends with `.t`), or
    /// `all-linear` (every projection but `lm_head`).
    pub target_modules: Vec<String>,
    /// Per-module rank overrides (PEFT `rank_pattern`, keys matched like targets).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-module alpha overrides (PEFT `alpha_pattern`).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl LoraSpec {
    /// A spec with PEFT's defaults for the rest.
    pub fn new(r: i64, alpha: f64, dropout: f64, use_rslora: bool, targets: &[String]) -> Self {
        Self {
            r,
            alpha,
            dropout,
            use_rslora,
            target_modules: targets.to_vec(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }

    fn all_linear(&self) -> bool {
        self.target_modules
            .iter()
            .any(|t| t == "all-linear" || t == "all_linear")
    }

    /// Whether `module` (a Hugging Face module name) gets an adapter.
    pub fn matches(&self, module: &str) -> bool {
        if module == "lm_head" {
            return self.target_modules.iter().any(|t| t == "lm_head");
        }
        self.all_linear() || self.target_modules.iter().any(|t| suffix_match(module, t))
    }

    /// Rank and scale for `module`, honouring `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_scale(&self, module: &str) -> (i64, f64) {
        let r = self
            .rank_pattern
            .iter()
            .find(|(k, _)| suffix_match(module, k))
            .map_or(self.r, |(_, v)| *v);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| suffix_match(module, k))
            .map_or(self.alpha, |(_, v)| *v);
        let rf = r.max(1) as f64;
        let scale = if self.use_rslora {
            alpha / rf.sqrt()
        } else {
            alpha / rf
        };
        (r, scale)
    }
}

fn suffix_match(module: &str, target: &str) -> bool {
    module == target
        || module
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

/// PEFT's key of an adapter tensor: `base_model.model.<module>.lora_<A|B>.weight`.
pub fn peft_key(module: &str, which: char) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{which}.weight")
}

/// Attaches fresh adapters to every projection `spec` matches and returns
/// their module names. `A` is drawn from libtorch's global generator (seed it
/// with `tch::manual_seed` for reproducible adapters); `B` is zero. Adapter
/// parameters are fp32 leaves that require gradients, on the model's device.
pub fn attach(model: &mut LlamaModel, spec: &LoraSpec) -> Result<Vec<String>> {
    if spec.r < 1 {
        return Err(EngineError::invalid(
            "r",
            format!("LoRA rank must be >= 1 (got {})", spec.r),
        ));
    }
    let device = model.device();
    let mut names = Vec::new();
    for (name, lin) in model.linears_mut() {
        if !spec.matches(&name) {
            continue;
        }
        let (r, scale) = spec.rank_and_scale(&name);
        let (out_f, in_f) = (lin.out_features(), lin.in_features());
        let bound = 1.0 / (in_f as f64).sqrt();
        let a = tch::no_grad(|| {
            let mut a = Tensor::empty([r, in_f], (Kind::Float, device));
            let _ = a.uniform_(-bound, bound);
            a
        })
        .set_requires_grad(true);
        let b = Tensor::zeros([out_f, r], (Kind::Float, device)).set_requires_grad(true);
        lin.lora = Some(LoraLayer::new(a, b, scale, spec.dropout));
        names.push(name);
    }
    if names.is_empty() {
        return Err(EngineError::invalid(
            "target_modules",
            format!(
                "{:?} matches no linear projection of the model (it has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
                spec.target_modules
            ),
        ));
    }
    Ok(names)
}

/// Removes every adapter.
pub fn detach(model: &mut LlamaModel) {
    for (_, lin) in model.linears_mut() {
        lin.lora = None;
    }
}

/// Switches every adapter on or off (the base model alone when off, with no reload).
pub fn set_enabled(model: &mut LlamaModel, enabled: bool) {
    for (_, lin) in model.linears_mut() {
        if let Some(l) = lin.lora.as_mut() {
            l.enabled = enabled;
        }
    }
}

/// Whether any adapter is attached.
pub fn has_adapters(model: &LlamaModel) -> bool {
    model.linears().iter().any(|(_, l)| l.lora.is_some())
}

/// The adapter tensors under PEFT key names (shallow copies of the trainable
/// leaves, in module order: A then B per module).
pub fn adapter_tensors(model: &LlamaModel) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (name, lin) in model.linears() {
        if let Some(l) = &lin.lora {
            out.push((peft_key(&name, 'A'), l.a.shallow_clone()));
            out.push((peft_key(&name, 'B'), l.b.shallow_clone()));
        }
    }
    out
}

/// `adapter_config.json` as PEFT reads it (the keys of PEFT's `LoraConfig`
/// that matter for a plain LoRA adapter; unknown keys are kept on load).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfigFile {
    /// `"LORA"`.
    pub peft_type: String,
    /// `"CAUSAL_LM"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model (folder or hub id).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Revision of the base model.
    #[serde(default)]
    pub revision: Option<String>,
    /// Saved as true.
    #[serde(default)]
    pub inference_mode: bool,
    /// Rank.
    pub r: i64,
    /// Alpha.
    pub lora_alpha: f64,
    /// Dropout.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Target modules: a list of suffixes, or a string (a regex, or `all-linear`).
    pub target_modules: serde_json::Value,
    /// Only false is supported (Llama has no Conv1D).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Only `"none"` is supported.
    #[serde(default = "bias_none")]
    pub bias: String,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (not supported here).
    #[serde(default)]
    pub use_dora: bool,
    /// Fully trained extra modules (not supported here).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// PEFT's init flag (irrelevant when loading).
    #[serde(default = "yes")]
    pub init_lora_weights: serde_json::Value,
    /// Layer selection (only null is supported).
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    /// Layer pattern (unused when `layers_to_transform` is null).
    #[serde(default)]
    pub layers_pattern: Option<serde_json::Value>,
    /// Per-module ranks.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-module alphas.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
}

fn bias_none() -> String {
    "none".into()
}

fn yes() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// Writes the attached adapters of `model` to `dir` in PEFT's format
/// (each file atomically). `base_model` is recorded as `base_model_name_or_path`.
pub fn save_peft(
    model: &LlamaModel,
    spec: &LoraSpec,
    base_model: Option<&str>,
    dir: &Path,
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = adapter_tensors(model)
        .into_iter()
        .map(|(k, t)| (k, t.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect();
    if tensors.is_empty() {
        return Err(EngineError::invalid(
            "adapter",
            "the model has no LoRA adapter to save",
        ));
    }
    let modules: BTreeSet<String> = model
        .linears()
        .into_iter()
        .filter(|(_, l)| l.lora.is_some())
        .map(|(n, _)| n.rsplit('.').next().unwrap_or(&n).to_owned())
        .collect();
    let cfg = PeftConfigFile {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: base_model.map(String::from),
        revision: None,
        inference_mode: true,
        r: spec.r,
        lora_alpha: spec.alpha,
        lora_dropout: spec.dropout,
        target_modules: serde_json::Value::from(modules.into_iter().collect::<Vec<_>>()),
        fan_in_fan_out: false,
        bias: "none".into(),
        use_rslora: spec.use_rslora,
        use_dora: false,
        modules_to_save: None,
        init_lora_weights: yes(),
        layers_to_transform: None,
        layers_pattern: None,
        rank_pattern: spec.rank_pattern.clone(),
        alpha_pattern: spec.alpha_pattern.clone(),
    };
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    crate::weights::save_safetensors(&dir.join(ADAPTER_WEIGHTS_FILE), &tensors)?;
    let path = dir.join(ADAPTER_CONFIG_FILE);
    lora_skill::fs::write_json_atomic(&path, &cfg).map_err(|e| EngineError::io(&path, e))
}

/// Reads and checks `adapter_config.json` of a PEFT adapter folder.
pub fn read_peft_config(dir: &Path) -> Result<PeftConfigFile> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(|e| EngineError::io(&path, e))?;
    let cfg: PeftConfigFile =
        serde_json::from_slice(&bytes).map_err(|e| EngineError::json(&path, &e))?;
    let unsupported = |what: &str, hint: &str| {
        Err(EngineError::format(
            &path,
            format!("{what} is not supported ({hint})"),
        ))
    };
    if cfg.peft_type != "LORA" {
        return unsupported(
            &format!("peft_type {:?}", cfg.peft_type),
            "only LoRA adapters load here",
        );
    }
    if cfg.use_dora {
        return unsupported("use_dora: true", "merge the DoRA adapter with PEFT first");
    }
    if cfg.fan_in_fan_out {
        return unsupported(
            "fan_in_fan_out: true",
            "Llama-family projections are not Conv1D",
        );
    }
    if cfg.bias != "none" {
        return unsupported(&format!("bias {:?}", cfg.bias), "train with bias=\"none\"");
    }
    if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return unsupported(
            "modules_to_save",
            "fully trained extra modules are not LoRA weights",
        );
    }
    if cfg
        .layers_to_transform
        .as_ref()
        .is_some_and(|v| !v.is_null())
    {
        return unsupported("layers_to_transform", "adapters on a subset of layers");
    }
    let regexy = |k: &str| k.chars().any(|c| "^$*+?()[]{}|\\".contains(c));
    if let Some(k) = cfg
        .rank_pattern
        .keys()
        .chain(cfg.alpha_pattern.keys())
        .find(|k| regexy(k))
    {
        return unsupported(
            &format!("the regular expression {k:?} in rank_pattern/alpha_pattern"),
            "use plain module names",
        );
    }
    if cfg.r < 1 {
        return Err(EngineError::format(
            &path,
            format!("r must be >= 1 (got {})", cfg.r),
        ));
    }
    Ok(cfg)
}

/// Loads a PEFT LoRA adapter folder onto `model` (replacing any attached
/// adapters) and returns its spec. The modules are those the weights file
/// names; every one must be a projection of the model with matching shapes,
/// and every tensor must be used. Adapter tensors become fp32 leaves that
/// require gradients (so an adapter can be trained further).
pub fn load_peft(model: &mut LlamaModel, dir: &Path) -> Result<LoraSpec> {
    let cfg = read_peft_config(dir)?;
    let wpath = dir.join(ADAPTER_WEIGHTS_FILE);
    if !wpath.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            "adapter_model.bin (torch.save) is not read here; re-save it with safe_serialization=True"
        } else {
            "a PEFT adapter folder has adapter_config.json and adapter_model.safetensors"
        };
        return Err(EngineError::format(&wpath, format!("missing ({hint})")));
    }
    let mut tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&wpath)
        .map_err(|e| EngineError::format(&wpath, e.to_string()))?
        .into_iter()
        // Keys saved with the adapter name (`lora_A.default.weight`) are accepted too.
        .map(|(k, t)| {
            (
                k.replace(".lora_A.default.", ".lora_A.")
                    .replace(".lora_B.default.", ".lora_B."),
                t,
            )
        })
        .collect();
    let targets: Vec<String> = match &cfg.target_modules {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let spec = LoraSpec {
        r: cfg.r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        use_rslora: cfg.use_rslora,
        target_modules: targets,
        rank_pattern: cfg.rank_pattern.clone(),
        alpha_pattern: cfg.alpha_pattern.clone(),
    };
    let device = model.device();
    let mut loaded = 0;
    let mut problems = Vec::new();
    for (name, lin) in model.linears_mut() {
        lin.lora = None;
        let (ka, kb) = (peft_key(&name, 'A'), peft_key(&name, 'B'));
        let (a, b) = match (tensors.remove(&ka), tensors.remove(&kb)) {
            (Some(a), Some(b)) => (a, b),
            (None, None) => continue,
            (Some(_), None) => {
                problems.push(format!("{kb} is missing"));
                continue;
            }
            (None, Some(_)) => {
                problems.push(format!("{ka} is missing"));
                continue;
            }
        };
        let (r, scale) = spec.rank_and_scale(&name);
        let (out_f, in_f) = (lin.out_features(), lin.in_features());
        if a.size() != [r, in_f] || b.size() != [out_f, r] {
            problems.push(format!(
                "{name}: lora_A {:?} / lora_B {:?}, expected [{r}, {in_f}] / [{out_f}, {r}]",
                a.size(),
                b.size()
            ));
            continue;
        }
        let a = a
            .to_kind(Kind::Float)
            .to_device(device)
            .set_requires_grad(true);
        let b = b
            .to_kind(Kind::Float)
            .to_device(device)
            .set_requires_grad(true);
        lin.lora = Some(LoraLayer::new(a, b, scale, spec.dropout));
        loaded += 1;
    }
    problems.extend(
        tensors
            .keys()
            .map(|k| format!("{k} matches no projection of the model")),
    );
    if !problems.is_empty() {
        detach(model);
        return Err(EngineError::format(
            &wpath,
            format!(
                "the adapter does not fit the model: {}",
                problems.join("; ")
            ),
        ));
    }
    if loaded == 0 {
        return Err(EngineError::format(
            &wpath,
            "the adapter holds no LoRA weights",
        ));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn contributes_scaled_low_rank_product_and_respects_enabled() {
        let a = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([3, 2], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
        let mut l = LoraLayer::new(a, b, 2.0, 0.5);
        assert_eq!(l.rank(), 2);
        let y = l.forward_t(&x, false).unwrap();
        let expect = x.matmul(&l.delta_weight().tr());
        assert!(f64::try_from((y - expect).abs().max()).unwrap() < 1e-5);
        // Dropout only in training: with p=0.5 some inputs are zeroed.
        let yt = l
            .forward_t(&Tensor::ones([64, 5], (Kind::Float, Device::Cpu)), true)
            .unwrap();
        let ye = l
            .forward_t(&Tensor::ones([64, 5], (Kind::Float, Device::Cpu)), false)
            .unwrap();
        assert!(f64::try_from((yt - ye).abs().max()).unwrap() > 0.0);
        l.enabled = false;
        assert!(l.forward_t(&x, false).is_none());
    }

    #[test]
    fn add_to_equals_base_plus_the_contribution_and_backpropagates_alike() {
        let a = Tensor::randn([2, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::randn([3, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut l = LoraLayer::new(a, b, 1.5, 0.0);
        // [batch, seq, in], as the model calls it.
        let x = Tensor::randn([2, 4, 5], (Kind::Float, Device::Cpu));
        let base = Tensor::randn([2, 4, 3], (Kind::Float, Device::Cpu));
        let fused = l.add_to(base.shallow_clone(), &x, true);
        let plain = &base + l.forward_t(&x, true).unwrap();
        assert_eq!(fused.size(), [2, 4, 3]);
        assert!(f64::try_from((&fused - &plain).abs().max()).unwrap() < 1e-6);
        let grads = |y: &Tensor| {
            let g =
                Tensor::run_backward(&[y.square().sum(Kind::Float)], &[&l.a, &l.b], false, false);
            (g[0].copy(), g[1].copy())
        };
        let (ga, gb) = grads(&fused);
        let (pa, pb) = grads(&plain);
        assert!(f64::try_from((ga - pa).abs().max()).unwrap() < 1e-5);
        assert!(f64::try_from((gb - pb).abs().max()).unwrap() < 1e-5);
        l.enabled = false;
        let off = l.add_to(base.shallow_clone(), &x, false);
        assert!(f64::try_from((off - &base).abs().max()).unwrap() == 0.0);
    }

    #[test]
    fn targets_match_like_peft() {
        let s = LoraSpec::new(8, 16.0, 0.0, false, &["q_proj".into(), "v_proj".into()]);
        assert!(s.matches("model.layers.0.self_attn.q_proj"));
        assert!(!s.matches("model.layers.0.self_attn.k_proj"));
        assert!(!s.matches("model.layers.0.self_attn.xq_proj"));
        let all = LoraSpec::new(8, 16.0, 0.0, true, &["all-linear".into()]);
        assert!(all.matches("model.layers.3.mlp.down_proj"));
        assert!(
            !all.matches("lm_head"),
            "all-linear leaves the output layer alone, as PEFT"
        );
        assert_eq!(all.rank_and_scale("x").1, 16.0 / 8f64.sqrt());
        let mut p = s.clone();
        p.rank_pattern.insert("v_proj".into(), 4);
        assert_eq!(
            p.rank_and_scale("model.layers.1.self_attn.v_proj"),
            (4, 4.0)
        );
        assert_eq!(
            p.rank_and_scale("model.layers.1.self_attn.q_proj"),
            (8, 2.0)
        );
        assert_eq!(
            peft_key("model.layers.0.self_attn.q_proj", 'A'),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
    }

    mod peft_interop {
        //! Both directions against Hugging Face PEFT, through the project's Python.
        use super::super::*;
        use crate::testutil::{max_abs_diff, run_python, tiny_models};
        use tch::{Device, Kind, Tensor};

        fn load(arch: &str) -> LlamaModel {
            LlamaModel::load(&tiny_models().join(arch), Kind::Float, Device::Cpu)
                .unwrap()
                .0
        }

        fn ids() -> Tensor {
            Tensor::from_slice(&[5i64, 17, 99, 3, 250, 8, 41, 77, 12, 300, 4, 6]).reshape([2, 6])
        }

        #[test]
        fn fresh_adapter_leaves_logits_unchanged_and_only_lora_trains() {
            let mut m = load("llama");
            let before = tch::no_grad(|| m.forward(&ids(), None, None).unwrap());
            tch::manual_seed(1);
            let spec = LoraSpec::new(4, 8.0, 0.0, false, &["all-linear".into()]);
            let names = attach(&mut m, &spec).unwrap();
            assert_eq!(
                names.len(),
                2 * 7,
                "all-linear = 7 projections per layer, not lm_head"
            );
            let after = tch::no_grad(|| m.forward(&ids(), None, None).unwrap());
            assert_eq!(max_abs_diff(&before, &after), 0.0);
            for (name, t) in m.state_dict() {
                assert!(!t.requires_grad(), "{name} must stay frozen");
            }
            let params = adapter_tensors(&m);
            assert_eq!(params.len(), 28);
            for (k, t) in &params {
                assert!(t.requires_grad(), "{k}");
            }
            // A ~ U(±1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))), B = 0.
            let a = &params[0].1;
            let bound = 1.0 / 64f64.sqrt();
            assert!(f64::try_from(a.abs().max()).unwrap() <= bound);
            assert!(f64::try_from(a.abs().max()).unwrap() > 0.8 * bound);
            assert_eq!(f64::try_from(params[1].1.abs().max()).unwrap(), 0.0);
            // Switching adapters off gives the base; on, the adapter.
            tch::no_grad(|| {
                let _ = params[1].1.shallow_clone().fill_(0.05);
            });
            let on = tch::no_grad(|| m.forward(&ids(), None, None).unwrap());
            assert!(max_abs_diff(&on, &before) > 1e-4);
            set_enabled(&mut m, false);
            let off = tch::no_grad(|| m.forward(&ids(), None, None).unwrap());
            assert_eq!(max_abs_diff(&off, &before), 0.0);
        }

        #[test]
        fn peft_loads_our_adapter_and_gives_our_logits() {
            // qwen2: q/k/v biases; rsLoRA scaling; every projection; non-zero B.
            let mut m = load("qwen2");
            tch::manual_seed(2);
            let spec = LoraSpec::new(4, 8.0, 0.1, true, &["all-linear".into()]);
            attach(&mut m, &spec).unwrap();
            tch::no_grad(|| {
                for (_, t) in adapter_tensors(&m) {
                    let _ = t.shallow_clone().uniform_(-0.2, 0.2);
                }
            });
            let dir = tempfile::tempdir().unwrap();
            let adapter = dir.path().join("adapter");
            save_peft(&m, &spec, Some("tiny-qwen2"), &adapter).unwrap();
            let ours = tch::no_grad(|| m.forward(&ids(), None, None).unwrap());
            let ids_file = dir.path().join("ids.safetensors");
            Tensor::write_safetensors(&[("ids", ids())], &ids_file).unwrap();
            let out = dir.path().join("peft.safetensors");
            let model_dir = tiny_models().join("qwen2");
            run_python(
                "peft_parity.py",
                &[
                    "logits",
                    model_dir.to_str().unwrap(),
                    adapter.to_str().unwrap(),
                    ids_file.to_str().unwrap(),
                    out.to_str().unwrap(),
                ],
            );
            let theirs = Tensor::read_safetensors(&out).unwrap().remove(0).1;
            let d = max_abs_diff(&ours, &theirs);
            assert!(d < 1e-4, "PEFT's logits differ from ours by {d}");
            // And the adapter changes the logits (the comparison is not vacuous).
            set_enabled(&mut m, false);
            let base = tch::no_grad(|| m.forward(&ids(), None, None).unwrap());
            assert!(max_abs_diff(&base, &theirs) > 1e-3);
        }

        #[test]
        fn we_load_an_adapter_peft_wrote() {
            let dir = tempfile::tempdir().unwrap();
            let adapter = dir.path().join("peft");
            let model_dir = tiny_models().join("llama");
            run_python(
                "peft_parity.py",
                &[
                    "make",
                    model_dir.to_str().unwrap(),
                    adapter.to_str().unwrap(),
                    "--r",
                    "4",
                    "--alpha",
                    "8",
                    "--targets",
                    "q_proj,v_proj,down_proj",
                ],
            );
            let mut m = load("llama");
            let spec = load_peft(&mut m, &adapter).unwrap();
            assert_eq!((spec.r, spec.alpha, spec.use_rslora), (4, 8.0, false));
            assert_eq!(adapter_tensors(&m).len(), 2 * 3 * 2);
            let r: std::collections::BTreeMap<String, Tensor> =
                Tensor::read_safetensors(adapter.join("reference.safetensors"))
                    .unwrap()
                    .into_iter()
                    .collect();
            let ours = tch::no_grad(|| m.forward(&r["ids"], None, None).unwrap());
            let d = max_abs_diff(&ours, &r["logits"]);
            assert!(d < 1e-4, "our logits differ from PEFT's by {d}");

            // Save again and reload: the same tensors.
            let again = dir.path().join("again");
            save_peft(&m, &spec, None, &again).unwrap();
            let mut m2 = load("llama");
            load_peft(&mut m2, &again).unwrap();
            for ((k1, a), (k2, b)) in adapter_tensors(&m).iter().zip(adapter_tensors(&m2).iter()) {
                assert_eq!(k1, k2);
                assert!(a.equal(b), "{k1}");
            }
        }

        #[test]
        fn a_mismatched_adapter_is_refused_by_name() {
            let dir = tempfile::tempdir().unwrap();
            let mut m = load("llama");
            tch::manual_seed(0);
            let spec = LoraSpec::new(4, 8.0, 0.0, false, &["q_proj".into()]);
            attach(&mut m, &spec).unwrap();
            save_peft(&m, &spec, None, dir.path()).unwrap();
            // The mistral fixture has the same shapes but no such problem; make one:
            // drop a B tensor and add a stray key.
            let wfile = dir.path().join(ADAPTER_WEIGHTS_FILE);
            let mut t = Tensor::read_safetensors(&wfile).unwrap();
            t.retain(|(k, _)| !k.contains("layers.1.self_attn.q_proj.lora_B"));
            t.push((
                "base_model.model.model.layers.7.mlp.up_proj.lora_A.weight".into(),
                Tensor::zeros([4, 64], (Kind::Float, Device::Cpu)),
            ));
            crate::weights::save_safetensors(&wfile, &t).unwrap();
            let err = load_peft(&mut m, dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("layers.1.self_attn.q_proj.lora_B.weight is missing"),
                "{err}"
            );
            assert!(
                err.contains("layers.7.mlp.up_proj.lora_A.weight matches no projection"),
                "{err}"
            );
            assert!(
                !has_adapters(&m),
                "a failed load leaves no half-loaded adapter"
            );
            // DoRA is refused with a hint.
            let cfgp = dir.path().join(ADAPTER_CONFIG_FILE);
            let mut cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&cfgp).unwrap()).unwrap();
            cfg["use_dora"] = serde_json::Value::Bool(true);
            std::fs::write(&cfgp, serde_json::to_vec(&cfg).unwrap()).unwrap();
            let err = read_peft_config(dir.path()).unwrap_err().to_string();
            assert!(err.contains("use_dora"), "{err}");
        }
    }
}

//! The compatibility engine (seed 002): modality matrix, recipe
//! requirements, quantised and GGUF bases, adapter rank against the model,
//! dataset schema against the recipe, and adapter/base match. Every finding
//! carries a stable code, a severity, a message and a fix hint.
//!
//! Codes: `gguf_not_trainable`, `modality_mismatch`, `quantized_base_full_ft`,
//! `prequantized_base`, `method_not_implemented`, `hidden_too_small`,
//! `rank_exceeds_hidden`, `rank_exceeds_module`, `unknown_target_module`,
//! `seq_exceeds_context`, `empty_dataset`, `small_dataset`,
//! `dataset_integrity`, `invalid_rows`, `missing_targets`, `no_target_field`,
//! `many_duplicates`, `truncation`, `eos_not_trained`, `zero_trainable_rows`,
//! `no_bf16`, `adapter_*`.

use std::path::Path;

use serde_json::Value;

use lora_spec::contracts::config::{Finding, Severity, Task};
use lora_spec::trial::TrialConfig;

use crate::dataset::DatasetInfo;
use crate::device::DeviceSpec;
use crate::memory::Recipe;
use crate::model::{Modality, ModelFacts};

/// The message seed 002 gives for a GGUF base.
pub const GGUF_MESSAGE: &str = "GGUF models cannot be trained. Use original format.";

/// Builds a finding.
pub fn finding(
    code: &str,
    severity: Severity,
    message: impl Into<String>,
    hint: impl Into<String>,
) -> Finding {
    let hint = hint.into();
    Finding {
        code: code.into(),
        severity,
        message: message.into(),
        hint: (!hint.is_empty()).then_some(hint),
        field: None,
    }
}

fn at(mut f: Finding, field: &str) -> Finding {
    f.field = Some(field.into());
    f
}

/// Seed 002's modality matrix: which dataset modalities a model modality accepts.
pub fn modality_compatible(model: Modality, data: Modality) -> bool {
    model == Modality::Multimodal || data == model || data == Modality::Multimodal
}

/// Seed 002's recipe table: minimum hidden size and whether a quantised base is allowed.
pub fn recipe_requirements(recipe: Recipe) -> (Option<u64>, bool) {
    match recipe {
        Recipe::Lora | Recipe::Qlora => (Some(64), true),
        Recipe::FullFt => (None, false),
        Recipe::Prefix | Recipe::Ia3 => (None, true),
    }
}

/// Suggests a recipe for a model and a memory budget (seed 002 `suggest_recipe`):
/// LoRA when the 16-bit weights take at most half the memory, else QLoRA.
pub fn suggest_recipe(facts: &ModelFacts, vram_gb: f64) -> Recipe {
    if facts.params.total as f64 * 2.0 / 1e9 <= vram_gb * 0.5 {
        Recipe::Lora
    } else {
        Recipe::Qlora
    }
}

/// A GGUF base: training is blocked outright.
pub fn gguf_finding() -> Finding {
    at(
        finding(
            "gguf_not_trainable",
            Severity::Error,
            GGUF_MESSAGE,
            "point base_model at the original Hugging Face checkpoint (config.json + safetensors) the GGUF was converted from",
        ),
        "base_model",
    )
}

/// Everything the engine checks at once.
#[derive(Debug, Clone)]
pub struct CompatRequest<'a> {
    /// The base model's facts.
    pub facts: &'a ModelFacts,
    /// Recipe.
    pub recipe: Recipe,
    /// The trial (targets, rank, sequence length), when there is one.
    pub trial: Option<&'a TrialConfig>,
    /// What the fine-tune is for.
    pub task: Task,
    /// The data, when profiled.
    pub dataset: Option<&'a DatasetInfo>,
    /// The device, when known.
    pub device: Option<&'a DeviceSpec>,
    /// Whether the trainer implements prefix tuning and IA3 (it does not yet).
    pub trainer_supports_prefix_ia3: bool,
}

/// Runs every check and returns the findings, errors first.
pub fn check_compatibility(req: &CompatRequest<'_>) -> Vec<Finding> {
    let f = req.facts;
    let mut out = Vec::new();

    // Modality.
    let data_modality = req.dataset.map_or(Modality::Text, DatasetInfo::modality);
    if !modality_compatible(f.modality, data_modality) || f.modality != Modality::Text {
        let ok = modality_compatible(f.modality, data_modality);
        out.push(at(
            finding(
                if ok { "multimodal_model" } else { "modality_mismatch" },
                if ok { Severity::Warning } else { Severity::Error },
                format!(
                    "the model takes {} input and the data is {}",
                    f.modality.as_str(),
                    data_modality.as_str()
                ),
                "the trainer fine-tunes text-only causal language models; pick a text model and text data",
            ),
            "dataset",
        ));
    }

    // Recipe requirements.
    let (min_hidden, quantized_ok) = recipe_requirements(req.recipe);
    if let Some(q) = &f.quantization {
        if !quantized_ok {
            out.push(at(
                finding(
                    "quantized_base_full_ft",
                    Severity::Error,
                    format!("the base is stored quantised ({q}); full fine-tuning cannot update quantised weights"),
                    "use method: lora or qlora on this base, or the original 16-bit checkpoint for full fine-tuning",
                ),
                "method",
            ));
        } else {
            out.push(at(
                finding(
                    "prequantized_base",
                    Severity::Warning,
                    format!("the base checkpoint is already quantised ({q}); adapters train on those weights"),
                    "prefer the original 16-bit checkpoint with method: qlora, so merging starts from exact weights",
                ),
                "base_model",
            ));
        }
    }
    if matches!(req.recipe, Recipe::Prefix | Recipe::Ia3) && !req.trainer_supports_prefix_ia3 {
        out.push(at(
            finding(
                "method_not_implemented",
                Severity::Error,
                format!(
                    "method {} is validated but the trainer implements lora and qlora only",
                    req.recipe.as_str()
                ),
                "use method: lora or qlora",
            ),
            "method",
        ));
    }
    if let Some(min) = min_hidden
        && f.hidden_size < min
    {
        out.push(at(
            finding(
                "hidden_too_small",
                Severity::Error,
                format!(
                    "hidden size {} is below {min}, the minimum for {}",
                    f.hidden_size,
                    req.recipe.as_str()
                ),
                "use a larger base model",
            ),
            "base_model",
        ));
    }

    // Adapter rank and targets.
    if let Some(t) = req.trial
        && matches!(req.recipe, Recipe::Lora | Recipe::Qlora)
    {
        let (mods, unknown) = f.select_targets(&t.target_modules);
        for u in &unknown {
            let close = f
                .module_names()
                .into_iter()
                .filter(|n| n.contains(u.as_str()) || u.contains(n.as_str()) || shares_prefix(n, u))
                .collect::<Vec<_>>();
            out.push(at(
                finding(
                    "unknown_target_module",
                    Severity::Error,
                    format!(
                        "target module `{u}` is not a linear projection of this {} model",
                        f.family.as_str()
                    ),
                    if close.is_empty() {
                        format!("available: {} (or all-linear)", f.module_names().join(", "))
                    } else {
                        format!(
                            "did you mean {}? available: {}",
                            close.join(" or "),
                            f.module_names().join(", ")
                        )
                    },
                ),
                "config.target_modules",
            ));
        }
        let r = u64::from(t.lora_rank);
        if r >= f.hidden_size {
            out.push(at(
                finding(
                    "rank_exceeds_hidden",
                    Severity::Error,
                    format!(
                        "lora_rank {r} is not below the hidden size {}",
                        f.hidden_size
                    ),
                    format!(
                        "a low-rank adapter needs r < hidden size; try r = {}",
                        (f.hidden_size / 8).max(1)
                    ),
                ),
                "config.lora_rank",
            ));
        } else if let Some(m) = mods.iter().find(|m| r > m.in_features.min(m.out_features)) {
            out.push(at(
                finding(
                    "rank_exceeds_module",
                    Severity::Warning,
                    format!(
                        "lora_rank {r} exceeds min(in, out) = {} of `{}`: the extra rank adds parameters, not capacity",
                        m.in_features.min(m.out_features),
                        m.name
                    ),
                    "lower lora_rank",
                ),
                "config.lora_rank",
            ));
        }
    }
    if let Some(t) = req.trial
        && u64::from(t.max_seq_length) > f.max_position_embeddings
    {
        out.push(at(
            finding(
                "seq_exceeds_context",
                Severity::Error,
                format!(
                    "max_seq_length {} exceeds the model's context of {} tokens",
                    t.max_seq_length, f.max_position_embeddings
                ),
                format!("set max_seq_length ≤ {}", f.max_position_embeddings),
            ),
            "config.max_seq_length",
        ));
    }

    // Dataset schema and integrity.
    if let Some(d) = req.dataset
        && !d.is_unknown()
    {
        out.extend(check_dataset(d, req));
    }

    // Device.
    if let Some(dev) = req.device
        && !dev.is_cpu()
        && !dev.bf16
    {
        out.push(finding(
            "no_bf16",
            Severity::Info,
            format!(
                "{} has no bfloat16: training runs in float16 with loss scaling",
                dev.name
            ),
            "",
        ));
    }

    out.sort_by_key(|f| match f.severity {
        Severity::Error => 0,
        Severity::Warning => 1,
        Severity::Info => 2,
    });
    out
}

fn shares_prefix(a: &str, b: &str) -> bool {
    a.len() >= 2 && b.len() >= 2 && a.as_bytes()[..2] == b.as_bytes()[..2]
}

fn check_dataset(d: &DatasetInfo, req: &CompatRequest<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let n = d.total_samples.unwrap_or(0);
    if d.total_samples == Some(0) {
        out.push(at(
            finding(
                "empty_dataset",
                Severity::Error,
                if d.invalid_rows > 0 {
                    format!("the dataset has no valid rows ({} invalid)", d.invalid_rows)
                } else {
                    "the dataset has no rows".to_string()
                },
                "check dataset.path and the file format (run `lora-trainer dataset analyze`)",
            ),
            "dataset.path",
        ));
        return out;
    }
    if d.invalid_rows > 0 {
        let share = d.invalid_rows as f64 / (n + d.invalid_rows) as f64;
        let (code, sev) = if share > 0.1 {
            ("dataset_integrity", Severity::Error)
        } else {
            ("invalid_rows", Severity::Warning)
        };
        out.push(at(
            finding(
                code,
                sev,
                format!("{} rows ({:.1} %) could not be read", d.invalid_rows, share * 100.0),
                "see invalid_examples in the dataset profile for lines and reasons; fix or drop them",
            ),
            "dataset.path",
        ));
    }
    if n > 0 && n < 1000 {
        out.push(finding(
            "small_dataset",
            Severity::Warning,
            format!("Dataset is very small ({n} samples). Consider using a larger dataset."),
            "few samples overfit quickly: keep epochs low, watch eval_loss, or add data",
        ));
    }
    let wants_target = matches!(req.task, Task::Instruction | Task::Chat | Task::Style);
    if wants_target && !d.has_target() {
        out.push(at(
            finding(
                "no_target_field",
                Severity::Warning,
                format!(
                    "task {} expects prompt/response records, but the data has no target field (columns: {})",
                    task_name(req.task),
                    d.columns.join(", ")
                ),
                "provide instruction/output, prompt/completion or messages; or set task: domain to train on all text",
            ),
            "dataset.format",
        ));
    }
    if d.bad_targets > 0 {
        out.push(at(
            finding(
                "missing_targets",
                if n > 0 && d.bad_targets * 2 > n {
                    Severity::Error
                } else {
                    Severity::Warning
                },
                format!("{} rows have a missing or empty target", d.bad_targets),
                "rows without a target teach nothing (or teach empty answers); drop or fill them",
            ),
            "dataset.path",
        ));
    }
    if n > 0 && d.duplicates * 10 > n {
        out.push(finding(
            "many_duplicates",
            Severity::Warning,
            format!("{} of {n} rows are exact duplicates", d.duplicates),
            "de-duplicate: repeated rows are over-weighted and leak into the eval split",
        ));
    }
    if let Some(t) = req.trial {
        let seq = u64::from(t.max_seq_length);
        match (d.p95_tokens, d.max_tokens) {
            (Some(p95), _) if p95 > seq => out.push(at(
                finding(
                    "truncation",
                    Severity::Warning,
                    format!("more than 5 % of records exceed max_seq_length {seq} (p95 = {p95} tokens) and will be truncated"),
                    format!("raise max_seq_length to {}", p95.div_ceil(64) * 64),
                ),
                "config.max_seq_length",
            )),
            (_, Some(max)) if max > seq => out.push(at(
                finding(
                    "truncation",
                    Severity::Info,
                    format!("the longest record ({max} tokens) exceeds max_seq_length {seq} and will be truncated"),
                    "",
                ),
                "config.max_seq_length",
            )),
            _ => {}
        }
    }
    if let Some((rendered, eos)) = d.eos_check
        && rendered > 0
        && eos < rendered
    {
        out.push(finding(
            "eos_not_trained",
            Severity::Warning,
            format!("{} of {rendered} rendered samples do not end with a trained end-of-sequence token", rendered - eos),
            "the model may never learn to stop: make sure EOS is appended and not masked (pad ≠ eos)",
        ));
    }
    if d.zero_trainable > 0 {
        out.push(finding(
            "zero_trainable_rows",
            Severity::Warning,
            format!("{} rendered samples have no trainable token", d.zero_trainable),
            "their prompt fills max_seq_length or their response is empty: raise max_seq_length or drop them",
        ));
    }
    out
}

fn task_name(t: Task) -> &'static str {
    match t {
        Task::Instruction => "instruction",
        Task::Domain => "domain",
        Task::Chat => "chat",
        Task::Style => "style",
    }
}

/// Checks a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`)
/// against a base model: PEFT type, recorded base model, targets, rank
/// against the hidden size, and every LoRA tensor's shape against the
/// module it adapts (an adapter trained on another base fails here).
pub fn check_adapter(adapter_dir: &Path, facts: &ModelFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    let cfg_path = adapter_dir.join("adapter_config.json");
    let cfg: Value = match std::fs::read_to_string(&cfg_path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => {
            out.push(finding(
                "adapter_config_unreadable",
                Severity::Error,
                format!("{}: {e}", cfg_path.display()),
                "an adapter folder holds adapter_config.json and adapter_model.safetensors (PEFT layout)",
            ));
            return out;
        }
    };
    let peft_type = cfg.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if !peft_type.eq_ignore_ascii_case("lora") {
        out.push(finding(
            "adapter_type",
            Severity::Error,
            format!("adapter peft_type is `{peft_type}`, not LORA"),
            "only LoRA adapters can be loaded",
        ));
    }
    if let Some(base) = cfg.get("base_model_name_or_path").and_then(Value::as_str)
        && !base.is_empty()
        && !same_model(base, &facts.name)
    {
        out.push(finding(
            "adapter_base_mismatch",
            Severity::Warning,
            format!(
                "the adapter records base `{base}`, this base is `{}`",
                facts.name
            ),
            "use the base the adapter was trained on; shapes are checked below",
        ));
    }
    let r = cfg.get("r").and_then(Value::as_u64).unwrap_or(0);
    if r >= facts.hidden_size {
        out.push(finding(
            "adapter_rank",
            Severity::Error,
            format!(
                "adapter rank {r} is not below the hidden size {}",
                facts.hidden_size
            ),
            "",
        ));
    }
    let targets: Vec<String> = match cfg.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        Some(Value::String(s)) if s == "all-linear" => vec!["all-linear".into()],
        _ => Vec::new(),
    };
    let (_, unknown) = facts.select_targets(&targets);
    if !unknown.is_empty() {
        out.push(finding(
            "adapter_targets",
            Severity::Error,
            format!(
                "the adapter targets modules this model lacks: {}",
                unknown.join(", ")
            ),
            format!(
                "this model's projections: {}",
                facts.module_names().join(", ")
            ),
        ));
    }
    match read_safetensors_shapes(&adapter_dir.join("adapter_model.safetensors")) {
        Ok(shapes) => {
            let mut bad = Vec::new();
            for (key, shape) in &shapes {
                if let Some(msg) = shape_mismatch(facts, key, shape) {
                    bad.push(msg);
                }
            }
            if !bad.is_empty() {
                out.push(finding(
                    "adapter_shape_mismatch",
                    Severity::Error,
                    format!(
                        "{} adapter tensors do not fit this base, e.g. {}",
                        bad.len(),
                        bad[0]
                    ),
                    "the adapter was trained on a different architecture or size",
                ));
            }
        }
        Err(e) => out.push(finding(
            "adapter_weights_unreadable",
            Severity::Error,
            e,
            "expected adapter_model.safetensors next to adapter_config.json",
        )),
    }
    out
}

fn same_model(a: &str, b: &str) -> bool {
    let short = |s: &str| {
        s.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(s)
            .to_ascii_lowercase()
    };
    short(a) == short(b)
}

fn shape_mismatch(facts: &ModelFacts, key: &str, shape: &[u64]) -> Option<String> {
    // base_model.model.model.layers.{i}.{path}.lora_{A,B}.weight
    let (prefix, which) = if let Some(p) = key.strip_suffix(".lora_A.weight") {
        (p, 'A')
    } else if let Some(p) = key.strip_suffix(".lora_B.weight") {
        (p, 'B')
    } else {
        return None;
    };
    let module = facts
        .linear_modules
        .iter()
        .filter(|m| prefix.ends_with(&format!(".{}", m.path)))
        .max_by_key(|m| m.path.len());
    let Some(m) = module else {
        return Some(format!("`{key}` adapts a module this model lacks"));
    };
    if let Some(layer) = layer_index(prefix)
        && layer >= facts.num_layers
    {
        return Some(format!(
            "`{key}` is for block {layer}, the model has {}",
            facts.num_layers
        ));
    }
    if shape.len() != 2 {
        return Some(format!("`{key}` has shape {shape:?}"));
    }
    let ok = match which {
        'A' => shape[1] == m.in_features,
        _ => shape[0] == m.out_features,
    };
    (!ok).then(|| {
        format!(
            "`{key}` has shape {shape:?} but {} is {}→{}",
            m.name, m.in_features, m.out_features
        )
    })
}

fn layer_index(prefix: &str) -> Option<u64> {
    let parts: Vec<&str> = prefix.split('.').collect();
    parts
        .windows(2)
        .find(|w| w[0] == "layers" || w[0] == "h")
        .and_then(|w| w[1].parse().ok())
}

/// Reads tensor names and shapes from a safetensors header (8-byte little-endian
/// length, then JSON) without reading the data.
fn read_safetensors_shapes(path: &Path) -> Result<Vec<(String, Vec<u64>)>, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| {
        format!(
            "{}: too short for a safetensors header: {e}",
            path.display()
        )
    })?;
    let n = u64::from_le_bytes(len);
    if n > 100 * 1024 * 1024 {
        return Err(format!(
            "{}: header of {n} bytes is not plausible",
            path.display()
        ));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)
        .map_err(|e| format!("{}: truncated header: {e}", path.display()))?;
    let v: Value = serde_json::from_slice(&buf)
        .map_err(|e| format!("{}: bad header JSON: {e}", path.display()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{}: header is not an object", path.display()))?;
    Ok(obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, t)| {
            let shape = t
                .get("shape")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            (k.clone(), shape)
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;
    use crate::model::{ResolveOptions, resolve_model};
    use serde_json::json;

    fn facts(id: &str) -> ModelFacts {
        resolve_model(id, &ResolveOptions::default()).unwrap()
    }

    fn codes(v: &[Finding]) -> Vec<&str> {
        v.iter().map(|f| f.code.as_str()).collect()
    }

    fn req<'a>(
        f: &'a ModelFacts,
        recipe: Recipe,
        trial: Option<&'a TrialConfig>,
        d: Option<&'a DatasetInfo>,
    ) -> CompatRequest<'a> {
        CompatRequest {
            facts: f,
            recipe,
            trial,
            task: Task::Instruction,
            dataset: d,
            device: None,
            trainer_supports_prefix_ia3: false,
        }
    }

    #[test]
    fn modality_matrix_is_seed_002s() {
        use Modality::*;
        assert!(modality_compatible(Text, Text) && modality_compatible(Text, Multimodal));
        assert!(!modality_compatible(Text, Image) && !modality_compatible(Image, Audio));
        for d in [Text, Image, Audio, Video, Multimodal] {
            assert!(modality_compatible(Multimodal, d));
        }
        let f = facts("gpt2");
        let img = DatasetInfo::from_profile(&json!({"columns": ["image"], "total_samples": 5000}));
        let found = check_compatibility(&req(&f, Recipe::Lora, None, Some(&img)));
        assert_eq!(found[0].code, "modality_mismatch");
        assert_eq!(found[0].severity, Severity::Error);
    }

    #[test]
    fn quantized_base_blocks_full_ft_but_allows_lora() {
        let mut f = facts("meta-llama/Llama-3.2-1B");
        f.quantization = Some("bitsandbytes-4bit".into());
        let full = check_compatibility(&req(&f, Recipe::FullFt, None, None));
        assert_eq!(codes(&full), ["quantized_base_full_ft"]);
        assert_eq!(full[0].severity, Severity::Error);
        let lora = check_compatibility(&req(&f, Recipe::Lora, None, None));
        assert_eq!(codes(&lora), ["prequantized_base"]);
        assert_eq!(lora[0].severity, Severity::Warning);
        assert_eq!(gguf_finding().message, GGUF_MESSAGE);
    }

    #[test]
    fn rank_targets_and_context() {
        let f = facts("HuggingFaceTB/SmolLM2-135M");
        let t = TrialConfig {
            lora_rank: 1024,
            target_modules: vec!["q_proj".into(), "qkv".into()],
            max_seq_length: 16384,
            ..Default::default()
        };
        let found = check_compatibility(&req(&f, Recipe::Lora, Some(&t), None));
        let c = codes(&found);
        for want in [
            "rank_exceeds_hidden",
            "unknown_target_module",
            "seq_exceeds_context",
        ] {
            assert!(c.contains(&want), "{c:?}");
        }
        let unknown = found
            .iter()
            .find(|f| f.code == "unknown_target_module")
            .unwrap();
        assert!(unknown.hint.as_deref().unwrap().contains("q_proj"));
        assert_eq!(unknown.field.as_deref(), Some("config.target_modules"));
        let t = TrialConfig {
            lora_rank: 256,
            target_modules: vec!["k_proj".into()],
            ..Default::default()
        };
        // k_proj is 576→192: rank 256 > 192 wastes parameters.
        let found = check_compatibility(&req(&f, Recipe::Lora, Some(&t), None));
        assert_eq!(codes(&found), ["rank_exceeds_module"]);
        let ia3 = check_compatibility(&req(&f, Recipe::Ia3, None, None));
        assert_eq!(codes(&ia3), ["method_not_implemented"]);
    }

    #[test]
    fn dataset_schema_and_integrity() {
        let f = facts("Qwen/Qwen2.5-0.5B");
        let t = TrialConfig::default();
        let raw = DatasetInfo::from_profile(&json!({
            "total_samples": 500, "columns": ["text"], "record_format": "text",
            "duplicates_found": 100, "invalid_rows": 3, "max_tokens": 900,
            "token_percentiles": {"p50": 100, "p95": 600, "p99": 800},
            "render_check": {"rendered": 100, "ends_with_unmasked_eos": 90, "zero_trainable": 2}
        }));
        let c = check_compatibility(&req(&f, Recipe::Lora, Some(&t), Some(&raw)));
        let c = codes(&c);
        for want in [
            "small_dataset",
            "no_target_field",
            "many_duplicates",
            "invalid_rows",
            "truncation",
            "eos_not_trained",
            "zero_trainable_rows",
        ] {
            assert!(c.contains(&want), "{want} missing from {c:?}");
        }
        let empty = DatasetInfo::from_profile(&json!({"total_samples": 0, "invalid_rows": 40}));
        let found = check_compatibility(&req(&f, Recipe::Lora, Some(&t), Some(&empty)));
        assert_eq!(found[0].code, "empty_dataset");
        let broken = DatasetInfo::from_profile(
            &json!({"total_samples": 100, "invalid_rows": 400, "has_output": true}),
        );
        let found = check_compatibility(&req(&f, Recipe::Lora, Some(&t), Some(&broken)));
        assert_eq!(found[0].code, "dataset_integrity");
        let mut domain = req(&f, Recipe::Lora, Some(&t), Some(&raw));
        domain.task = Task::Domain;
        assert!(!codes(&check_compatibility(&domain)).contains(&"no_target_field"));
    }

    fn write_adapter(dir: &Path, base: &str, r: u64, in_f: u64, out_f: u64, layer: u64) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("adapter_config.json"),
            json!({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "base_model_name_or_path": base,
                   "target_modules": ["q_proj"]})
            .to_string(),
        )
        .unwrap();
        let prefix = format!("base_model.model.model.layers.{layer}.self_attn.q_proj");
        let header = json!({
            format!("{prefix}.lora_A.weight"): {"dtype": "F32", "shape": [r, in_f], "data_offsets": [0, 0]},
            format!("{prefix}.lora_B.weight"): {"dtype": "F32", "shape": [out_f, r], "data_offsets": [0, 0]},
        })
        .to_string();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
    }

    #[test]
    fn adapters_are_checked_against_the_base() {
        let f = facts("HuggingFaceTB/SmolLM2-135M");
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        write_adapter(&good, "HuggingFaceTB/SmolLM2-135M", 8, 576, 576, 3);
        assert!(
            check_adapter(&good, &f).is_empty(),
            "{:?}",
            check_adapter(&good, &f)
        );
        // Trained on the 360M model: hidden 960.
        let other = tmp.path().join("other");
        write_adapter(&other, "HuggingFaceTB/SmolLM2-360M", 8, 960, 960, 31);
        let c = check_adapter(&other, &f);
        assert_eq!(
            codes(&c),
            ["adapter_base_mismatch", "adapter_shape_mismatch"]
        );
        let missing = check_adapter(&tmp.path().join("nope"), &f);
        assert_eq!(codes(&missing), ["adapter_config_unreadable"]);
    }
}

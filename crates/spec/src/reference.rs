//! The reference of every spec key (type, default, meaning), generated from
//! the spec types' own JSON schemas so the docs cannot drift from the code.
//! `docs/SPEC.md` embeds it; a test fails when the committed copy is stale
//! (`cargo xtask codegen` rewrites it).

use serde_json::Value;

use crate::experiment::ExperimentFile;
use crate::training_config::TrainingConfig;

/// Marker lines around the generated part of docs/SPEC.md.
pub const BEGIN: &str = "<!-- BEGIN GENERATED REFERENCE (cargo xtask codegen) -->";
/// End marker.
pub const END: &str = "<!-- END GENERATED REFERENCE -->";

fn type_of(s: &Value) -> String {
    if let Some(vals) = s.get("enum").and_then(Value::as_array) {
        let v: Vec<String> = vals
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect();
        return format!("one of {}", v.join(" \\| "));
    }
    if let Some(c) = s.get("const") {
        return format!("`{c}`");
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(items) = s.get(key).and_then(Value::as_array) {
            let parts: Vec<String> = items.iter().map(type_of).filter(|t| t != "null").collect();
            let mut parts = parts;
            parts.dedup();
            return parts.join(" or ");
        }
    }
    match s.get("type") {
        Some(Value::String(t)) if t == "array" => {
            let inner = s.get("items").map(type_of).unwrap_or_else(|| "any".into());
            format!("list of {inner}")
        }
        Some(Value::String(t)) if t == "object" && s.get("properties").is_none() => {
            let inner = s
                .get("additionalProperties")
                .map(type_of)
                .unwrap_or_else(|| "any".into());
            format!("map of {inner}")
        }
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".into(),
    }
}

fn object_props(s: &Value) -> Option<&serde_json::Map<String, Value>> {
    if let Some(p) = s.get("properties").and_then(Value::as_object) {
        return Some(p);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(items) = s.get(key).and_then(Value::as_array) {
            for i in items {
                if let Some(p) = object_props(i) {
                    return Some(p);
                }
            }
        }
    }
    None
}

fn walk(
    schema: &Value,
    prefix: &str,
    defaults: Option<&Value>,
    required: &[String],
    rows: &mut Vec<String>,
) {
    let Some(props) = object_props(schema) else {
        return;
    };
    for (k, s) in props {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let default: String = s
            .get("default")
            .or_else(|| defaults.and_then(|d| d.get(k)))
            .map(|d| format!("`{d}`"))
            .unwrap_or_else(|| {
                if required.contains(k) {
                    "required".into()
                } else {
                    "none".into()
                }
            });
        let desc = s
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .replace('\n', " ")
            .replace('|', "\\|");
        let nested = object_props(s).is_some();
        let default = if nested && !required.contains(k) {
            "see below".to_string()
        } else {
            default
        };
        let ty = if nested {
            "section".to_string()
        } else {
            type_of(s)
        };
        rows.push(format!("| `{path}` | {ty} | {default} | {desc} |"));
        if nested {
            let req: Vec<String> = s
                .get("required")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let sub_defaults = s.get("default").or_else(|| defaults.and_then(|d| d.get(k)));
            walk(s, &path, sub_defaults, &req, rows);
        }
    }
}

fn table(title: &str, schema: Value, defaults: Option<Value>) -> String {
    let req: Vec<String> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut rows = Vec::new();
    walk(&schema, "", defaults.as_ref(), &req, &mut rows);
    format!(
        "### {title}\n\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n{}\n",
        rows.join("\n")
    )
}

/// The generated reference (markdown, between [`BEGIN`] and [`END`]).
pub fn spec_reference() -> String {
    let exp =
        serde_json::to_value(lora_skill::schema_of::<ExperimentFile>()).unwrap_or(Value::Null);
    let trial_defaults = serde_json::to_value(crate::TrialConfig::default()).ok();
    let mut exp_defaults = serde_json::Map::new();
    if let Some(t) = trial_defaults {
        exp_defaults.insert("config".into(), t);
    }
    let tc = serde_json::to_value(lora_skill::schema_of::<TrainingConfig>()).unwrap_or(Value::Null);
    let tc_defaults = serde_json::to_value(TrainingConfig::default()).ok();
    format!(
        "{BEGIN}\n\n{}\n{}{END}\n",
        table(
            "Experiment document (YAML or JSON)",
            exp,
            Some(Value::Object(exp_defaults))
        ),
        table(
            "TrainingConfig file (seed 003, `--config-file`)",
            tc,
            tc_defaults
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_covers_every_section_and_key() {
        let r = spec_reference();
        for key in [
            "`dataset.path`",
            "`config.lora_rank`",
            "`config.learning_rate`",
            "`protocol.budget_gpu_hours`",
            "`protocol.ablation.param`",
            "`output.export_format`",
            "`search_space.lr_min`",
            "`optimizer.learning_rate`",
            "`grpo.reward.weights.format_weight`",
        ] {
            assert!(r.contains(key), "{key} missing from the reference");
        }
        assert!(
            r.contains("| `config.lora_rank` | integer | `16` |"),
            "defaults shown"
        );
    }

    #[test]
    fn committed_spec_doc_is_fresh() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/SPEC.md");
        let doc = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            doc.contains(&spec_reference()),
            "docs/SPEC.md is stale or missing its generated reference: run `cargo xtask codegen`"
        );
    }
}

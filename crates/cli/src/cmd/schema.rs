//! `lora-trainer schema`: the JSON schemas of every registered skill and of
//! the experiment spec, as plain JSON Schema or as OpenAI / Anthropic tool
//! definitions for LLM tool-calling.

use std::path::PathBuf;

use clap::ValueEnum;
use lora_skill::{SkillRegistry, schema_of};
use serde_json::{Value, json};

use crate::output;

/// Output flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Plain JSON Schema (draft 2020-12): input and output of every skill, and the spec.
    JsonSchema,
    /// OpenAI `tools` array (`type: function`, `parameters`).
    OpenaiTools,
    /// Anthropic `tools` array (`name`, `description`, `input_schema`).
    AnthropicTools,
}

/// `schema` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Write one file per schema into this folder instead of printing.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Output flavour.
    #[arg(long, value_enum, default_value_t = Format::JsonSchema)]
    pub format: Format,
}

/// A tool-ready schema: no `$schema` key (tool APIs reject or ignore it).
fn tool_schema(s: schemars::Schema) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("$schema");
    }
    v
}

/// Named documents for `--format json-schema` (file stem → schema).
pub fn json_schema_documents(reg: &SkillRegistry) -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    docs.push((
        "experiment".to_string(),
        serde_json::to_value(schema_of::<lora_spec::ExperimentFile>()).unwrap_or(Value::Null),
    ));
    docs.push((
        "experiment_spec".to_string(),
        serde_json::to_value(schema_of::<lora_spec::ExperimentSpec>()).unwrap_or(Value::Null),
    ));
    docs.push((
        "training_config".to_string(),
        serde_json::to_value(schema_of::<lora_spec::training_config::TrainingConfig>())
            .unwrap_or(Value::Null),
    ));
    for s in reg.iter() {
        let mut input = serde_json::to_value(s.input_schema()).unwrap_or(Value::Null);
        if let Some(o) = input.as_object_mut() {
            o.insert(
                "description".into(),
                Value::String(s.description().to_string()),
            );
        }
        docs.push((format!("{}.input", s.name()), input));
        docs.push((
            format!("{}.output", s.name()),
            serde_json::to_value(s.output_schema()).unwrap_or(Value::Null),
        ));
    }
    docs
}

/// The tools array for `--format openai-tools|anthropic-tools`.
pub fn tools(reg: &SkillRegistry, format: Format) -> Value {
    let items: Vec<Value> = reg
        .iter()
        .map(|s| match format {
            Format::AnthropicTools => json!({
                "name": s.name(),
                "description": s.description(),
                "input_schema": tool_schema(s.input_schema()),
            }),
            _ => json!({
                "type": "function",
                "function": {
                    "name": s.name(),
                    "description": s.description(),
                    "parameters": tool_schema(s.input_schema()),
                }
            }),
        })
        .collect();
    Value::Array(items)
}

/// Runs the command.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let reg = crate::skills::registry();
    match (args.format, &args.out) {
        (Format::JsonSchema, None) => {
            let all: serde_json::Map<String, Value> =
                json_schema_documents(&reg).into_iter().collect();
            output::json(&all)
        }
        (Format::JsonSchema, Some(dir)) => {
            for (name, doc) in json_schema_documents(&reg) {
                let path = dir.join(format!("{name}.schema.json"));
                lora_skill::fs::write_json_atomic(&path, &doc)?;
            }
            output::line(&format!("wrote schemas to {}", dir.display()))
        }
        (f, None) => output::json(&tools(&reg, f)),
        (f, Some(dir)) => {
            let name = if f == Format::OpenaiTools {
                "openai-tools.json"
            } else {
                "anthropic-tools.json"
            };
            let path = dir.join(name);
            lora_skill::fs::write_json_atomic(&path, &tools(&reg, f))?;
            output::line(&format!("wrote {}", path.display()))
        }
    }
}

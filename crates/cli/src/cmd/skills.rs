//! `lora-trainer skills` and `lora-trainer skill NAME --input JSON|@file|-`.

use std::io::Read;

use anyhow::Context;
use clap::Args;
use lora_skill::SkillContext;

use crate::exit::{Failed, Usage};
use crate::output;

/// `skills` options.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `skill` options.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// The skill's registry name (see `lora-trainer skills`).
    pub name: String,
    /// The input: inline JSON, `@path/to/file.json`, or `-` for standard input.
    #[arg(long, short)]
    pub input: String,
    /// Working directory for relative paths in the input (default: current).
    #[arg(long)]
    pub work_dir: Option<std::path::PathBuf>,
}

/// Lists the registered skills.
pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let reg = crate::skills::registry();
    let infos = reg.list();
    if args.json {
        output::json(&infos)
    } else {
        let rows: Vec<Vec<String>> = infos
            .iter()
            .map(|i| {
                vec![
                    i.name.clone(),
                    if i.requires_gpu { "yes" } else { "no" }.into(),
                    i.description.clone(),
                ]
            })
            .collect();
        output::table(&["skill", "gpu", "description"], rows)
    }
}

/// Reads `--input` in any of its three forms.
pub fn read_input(spec: &str) -> anyhow::Result<serde_json::Value> {
    let (text, origin) = if spec == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the input from standard input")?;
        (s, "<stdin>".to_string())
    } else if let Some(path) = spec.strip_prefix('@') {
        let s = std::fs::read_to_string(path)
            .map_err(|e| Usage(format!("cannot read the input file {path}: {e}")))?;
        (s, path.to_string())
    } else {
        (spec.to_string(), "--input".to_string())
    };
    serde_json::from_str(&text).map_err(|e| {
        Usage(format!(
            "{origin}:{}:{}: the input is not valid JSON: {e}",
            e.line(),
            e.column()
        ))
        .into()
    })
}

/// Runs one skill and prints its StepResult as JSON.
pub async fn call(args: CallArgs) -> anyhow::Result<()> {
    let reg = crate::skills::registry();
    let input = read_input(&args.input)?;
    let dir = match args.work_dir {
        Some(d) => d,
        None => std::env::current_dir().context("reading the current directory")?,
    };
    let sink = crate::render::BarSink::new(false);
    let ctx = SkillContext::new(dir)
        .with_sink(sink)
        .with_cancel(crate::render::ctrl_c_token());
    let result = reg.call_json(&args.name, input, &ctx).await?;
    output::json(&result)?;
    if result.data.get("status").and_then(|s| s.as_str()) == Some("failed") {
        return Err(Failed(format!("skill `{}` reported status failed", args.name)).into());
    }
    Ok(())
}

//! The built-in table of common base models (`data/models.json`), for
//! planning without the weights or a network: each entry holds the
//! architecture fields of the model's config.json, so it goes through the
//! same parser as a real folder.

use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

/// One built-in model.
#[derive(Debug, Clone, Deserialize)]
pub struct CatalogEntry {
    /// Hub id.
    pub id: String,
    /// Other names that mean the same architecture (instruct variants, mirrors).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Parameter count transformers reports for this config.
    pub params: u64,
    /// config.json fields.
    pub config: Value,
}

#[derive(Deserialize)]
struct Catalog {
    models: Vec<CatalogEntry>,
}

static CATALOG: OnceLock<Vec<CatalogEntry>> = OnceLock::new();

/// Every built-in model.
pub fn entries() -> &'static [CatalogEntry] {
    CATALOG.get_or_init(|| {
        // The table is compiled in and checked by this crate's tests, so a
        // parse failure cannot reach users; fall back to an empty table anyway.
        serde_json::from_str::<Catalog>(include_str!("../data/models.json"))
            .map(|c| c.models)
            .unwrap_or_default()
    })
}

fn norm(s: &str) -> String {
    s.trim().to_ascii_lowercase()
}

/// Finds a model by hub id, alias, or the name after the organisation (`Llama-3.2-1B`), case-insensitively.
pub fn lookup(name: &str) -> Option<&'static CatalogEntry> {
    let n = norm(name);
    let short = |s: &str| norm(s.rsplit('/').next().unwrap_or(s));
    entries()
        .iter()
        .find(|e| norm(&e.id) == n || e.aliases.iter().any(|a| norm(a) == n))
        .or_else(|| {
            if n.contains('/') {
                return None;
            }
            entries()
                .iter()
                .find(|e| short(&e.id) == n || e.aliases.iter().any(|a| short(a) == n))
        })
}

/// Up to three built-in ids close to `name` (shared prefix or small edit distance).
pub fn suggest(name: &str) -> Vec<String> {
    let n = norm(name);
    let n_short = n.rsplit('/').next().unwrap_or(&n).to_string();
    let mut scored: Vec<(usize, &str)> = entries()
        .iter()
        .map(|e| {
            let id = norm(&e.id);
            let id_short = id.rsplit('/').next().unwrap_or(&id).to_string();
            let d = edit_distance(&n_short, &id_short);
            let bonus = if id_short.starts_with(&n_short) || n_short.starts_with(&id_short) {
                0
            } else {
                d
            };
            (bonus.min(d), e.id.as_str())
        })
        .filter(|(d, _)| *d <= n_short.len().max(3) / 3 + 1)
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(3)
        .map(|(_, id)| id.to_string())
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::print_stderr)] // Tests: a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn table_parses_and_names_resolve() {
        assert!(entries().len() >= 20);
        assert_eq!(
            lookup("llama-3.2-1b").map(|e| e.id.as_str()),
            Some("meta-llama/Llama-3.2-1B")
        );
        assert_eq!(
            lookup("unsloth/Llama-3.2-1B").map(|e| e.params),
            Some(1_235_814_400)
        );
        assert_eq!(lookup("gpt2").map(|e| e.params), Some(124_439_808));
        assert!(lookup("acme/unknown").is_none());
        assert!(suggest("SmolLM2-135").contains(&"HuggingFaceTB/SmolLM2-135M".to_string()));
    }

    /// The recorded counts are what transformers itself reports: every config
    /// is instantiated on the meta device and its parameters summed.
    #[test]
    fn catalog_matches_transformers() {
        let Some(python) = std::env::var_os("LORA_TRAINER_PYTHON") else {
            // `.cargo/config.toml` sets it; only a bare `rustc --test` lacks it.
            eprintln!("LORA_TRAINER_PYTHON unset: transformers cross-check not run");
            return;
        };
        let script = r#"
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
for m in json.load(sys.stdin)["models"]:
    cfg = dict(m["config"]); mt = cfg.pop("model_type")
    for k in ("architectures", "torch_dtype"): cfg.pop(k, None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg))
    print(m["id"], sum(p.numel() for p in model.parameters()))
"#;
        let mut child = std::process::Command::new(python)
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run the project's python");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin
                .write_all(include_bytes!("../data/models.json"))
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut seen = 0;
        for line in text.lines() {
            let (id, n) = line.split_once(' ').unwrap();
            let e = lookup(id).unwrap();
            let ours = crate::model::ModelFacts::from_config(id, "builtin", None, &e.config)
                .unwrap()
                .params
                .total;
            assert_eq!(ours, n.parse::<u64>().unwrap(), "{id}");
            seen += 1;
        }
        assert_eq!(seen, entries().len());
    }
}

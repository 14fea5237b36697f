//! Shared fixtures of the integration tests: tiny random-init models and PEFT
//! adapters made by transformers + PEFT themselves (tests/py/fixture.py), built
//! once per test binary, and helpers that run the Python oracles.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stderr)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The project's Python (transformers, PEFT, gguf, torch), if usable.
pub fn python() -> Option<PathBuf> {
    static PY: OnceLock<Option<PathBuf>> = OnceLock::new();
    PY.get_or_init(|| {
        let p = PathBuf::from(std::env::var_os("LORA_TRAINER_PYTHON")?);
        let ok = Command::new(&p)
            .args(["-c", "import torch, transformers, peft, gguf, safetensors"])
            .status()
            .ok()?
            .success();
        ok.then_some(p)
    })
    .clone()
}

/// Whether llama-cpp-python is importable.
pub fn has_llama_cpp() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        python().is_some_and(|p| {
            Command::new(p)
                .args(["-c", "import llama_cpp"])
                .status()
                .is_ok_and(|s| s.success())
        })
    })
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/fixture.py")
}

/// Runs `fixture.py ARGS` and parses its last stdout line as JSON.
pub fn py(args: &[&str]) -> Value {
    let py = python().expect("python");
    let out = Command::new(py)
        .arg(script())
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "fixture.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("{}");
    serde_json::from_str(last).unwrap()
}

/// The fixture folder (built once): llama/, qwen/, a_plain/, a_rs/, a_dora/, a_embed/, a_second/, q_plain/.
pub fn suite() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        python()?;
        let dir = tempfile::Builder::new()
            .prefix("lora-merge-fixtures")
            .tempdir()
            .unwrap()
            .keep();
        py(&["suite", dir.to_str().unwrap()]);
        Some(dir)
    })
    .as_deref()
}

/// Skips the calling test (returns None) with a clear message when Python is absent.
pub fn require_python(test: &str) -> Option<&'static Path> {
    let s = suite();
    if s.is_none() {
        eprintln!(
            "SKIPPED {test}: $LORA_TRAINER_PYTHON with torch, transformers, peft and gguf is not available \
             (run `cargo xtask setup`)"
        );
    }
    s
}

/// A fresh temporary directory kept until the process ends.
pub fn scratch() -> PathBuf {
    tempfile::Builder::new()
        .prefix("lora-merge-test")
        .tempdir()
        .unwrap()
        .keep()
}

/// Max |a - b|.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Flattens a nested JSON array of numbers.
pub fn flat(v: &Value) -> Vec<f32> {
    let mut out = Vec::new();
    fn go(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| go(x, out)),
            Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
            _ => {}
        }
    }
    go(v, &mut out);
    out
}

/// The prompts the fixture computed logits for.
pub fn prompts(adapter_dir: &Path) -> Value {
    let v: Value =
        serde_json::from_slice(&std::fs::read(adapter_dir.join("logits.json")).unwrap()).unwrap();
    v["prompts"].clone()
}

/// A logits array of logits.json (`logits` = base + adapter through PEFT, `merged_logits` = PEFT merged).
pub fn fixture_logits(adapter_dir: &Path, key: &str) -> Vec<f32> {
    let v: Value =
        serde_json::from_slice(&std::fs::read(adapter_dir.join("logits.json")).unwrap()).unwrap();
    flat(&v[key])
}

//! `lora-trainer model import` and `generate` through the binary: the GGUF
//! that `cargo xtask setup` downloads (SmolLM2-135M-Instruct, Q4_1) becomes a
//! Hugging Face folder that answers "Paris" through its chat template; bad
//! input exits 2 with the file named.
//!
//! Needs `cargo xtask setup` (which CI runs first).

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lora-trainer");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|x| !x.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
        .join("lora-trainer")
}

#[test]
fn a_gguf_imports_to_a_folder_that_answers_paris() {
    let gguf = cache().join("downloads/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.is_file(),
        "{} is missing: run `cargo xtask setup`",
        gguf.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smol");
    let o = run(&[
        "model",
        "import",
        gguf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 30);
    // A second import into the same folder refuses to overwrite without --force.
    let o = run(&[
        "model",
        "import",
        gguf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("--force"), "{}", text(&o));

    let o = run(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "16",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let all = g.to_string();
    assert!(all.contains("Paris"), "{all}");
    assert!(
        all.contains("token_ids"),
        "--json adds the token ids: {all}"
    );
}

#[test]
fn bad_models_and_adapters_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("model.gguf");
    std::fs::write(&not_gguf, b"definitely not a GGUF file").unwrap();
    let o = run(&[
        "model",
        "import",
        not_gguf.to_str().unwrap(),
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("model.gguf"), "{}", text(&o));
    assert!(!text(&o).contains("panicked"), "{}", text(&o));

    let model = cache().join("models/SmolLM2-135M-Instruct");
    let missing = Path::new("/nonexistent/adapter");
    let o = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        missing.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("/nonexistent/adapter"), "{}", text(&o));
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
}

#[test]
fn bench_gemm_times_both_backends_and_names_a_bad_shape() {
    let o = run(&[
        "bench",
        "gemm",
        "--shapes",
        "64x32x48,5x7x3",
        "--reps",
        "2",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(i64, String)> = rows
        .iter()
        .map(|r| {
            (
                r["m"].as_i64().unwrap(),
                r["gemm"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (64, "native".to_owned()),
            (64, "libtorch".to_owned()),
            (5, "native".to_owned()),
            (5, "libtorch".to_owned())
        ]
    );
    for r in &rows {
        assert!(r["gflops_median"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["threads"].as_i64(), Some(2), "{r}");
    }
    let o = run(&["bench", "gemm", "--shapes", "64x32"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("`64x32` is not MxKxN"), "{}", text(&o));
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
}

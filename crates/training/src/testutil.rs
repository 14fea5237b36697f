//! Test helpers: the tiny Llama fixture made by transformers (the engine's
//! `tests/fixtures/tiny_models.py`, cached on disk) and small datasets.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The project's Python (`LORA_TRAINER_PYTHON`, set by .cargo/config.toml).
pub fn python() -> PathBuf {
    std::env::var_os("LORA_TRAINER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".pyenv/bin/python"))
}

/// The tiny llama fixture folder (config.json, model.safetensors, tokenizer.json with a chat template).
pub fn tiny_llama() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = repo_root().join("tests/fixtures/tiny_models.py");
        let text = std::fs::read(&script).expect("fixture script");
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        "llama".hash(&mut h);
        let dir =
            std::env::temp_dir().join(format!("lora-training-fixtures/tiny-{:016x}", h.finish()));
        if !dir.join(".done").is_file() {
            let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).expect("fixture dir");
            let out = Command::new(python())
                .arg(&script)
                .arg(&tmp)
                .args(["--archs", "llama"])
                .env("OMP_NUM_THREADS", "2")
                .output()
                .expect("run the project's Python (cargo xtask setup)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(tmp.join(".done"), b"").expect("marker");
            if std::fs::rename(&tmp, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        dir.join("llama")
    })
}

/// Writes an alpaca-style jsonl of `n` rows to `path`.
pub fn write_alpaca(path: &Path, n: usize) {
    let words = [
        "the quick brown fox",
        "lora adapters train",
        "one two three four",
        "what is the capital of france",
    ];
    let mut s = String::new();
    for i in 0..n {
        let ins = words[i % words.len()];
        let out = words[(i * 3 + 1) % words.len()];
        let extra = "five six seven ".repeat(i % 3);
        s.push_str(
            &serde_json::json!({"instruction": format!("{ins} {i}"), "input": "", "output": format!("{extra}{out}")})
                .to_string(),
        );
        s.push('\n');
    }
    std::fs::write(path, s).expect("write dataset");
}

//! Test helpers: the project's Python (transformers, gguf) and the tiny
//! fixture models it makes, built once per test process and cached on disk.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The project's Python (`LORA_TRAINER_PYTHON`, set by .cargo/config.toml).
pub fn python() -> PathBuf {
    std::env::var_os("LORA_TRAINER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".pyenv/bin/python"))
}

/// Runs a Python script of tests/fixtures with arguments; panics with its stderr on failure.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let path = repo_root().join("tests/fixtures").join(script);
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .env("OMP_NUM_THREADS", "2")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (run `cargo xtask setup`)",
                python().display()
            )
        });
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A cache folder keyed by the content of a fixture script (made once, reused across runs).
pub fn cached_fixture(script: &str, args: &[&str]) -> PathBuf {
    let text =
        std::fs::read(repo_root().join("tests/fixtures").join(script)).expect("fixture script");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    args.hash(&mut h);
    let dir =
        std::env::temp_dir().join(format!("lora-engine-fixtures/{script}-{:016x}", h.finish()));
    if dir.join(".done").is_file() {
        return dir;
    }
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("fixture dir");
    let mut full: Vec<&str> = vec![tmp.to_str().expect("utf-8 temp path")];
    full.extend_from_slice(args);
    run_python(script, &full);
    std::fs::write(tmp.join(".done"), b"").expect("marker");
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process finished first: use theirs.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

/// The tiny llama/mistral/qwen2 fixtures with transformers' reference outputs.
pub fn tiny_models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_fixture("tiny_models.py", &[]))
}

/// Attaches rank-4 adapters to every projection of `m` (`all-linear`,
/// alpha 8, no dropout) and draws their `B` from N(0, 0.05²), so that the
/// adapters change the output and every adapter gradient is non-zero.
pub fn attach_live_lora(m: &mut crate::LlamaModel) {
    crate::lora::attach(
        m,
        &crate::lora::LoraSpec::new(4, 8.0, 0.0, false, &["all-linear".into()]),
    )
    .expect("attach");
    tch::no_grad(|| {
        for (_, lin) in m.linears_mut() {
            if let Some(l) = lin.lora.as_mut() {
                let _ = l.b.normal_(0.0, 0.05);
            }
        }
    });
}

/// Largest absolute difference of two tensors.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).expect("scalar")
}

//! Reproducibility manifest (seed 001 §9): `create_manifest(spec, state,
//! experiment_id)` records every seed, the resolved hyper-parameters of the
//! base config and of every trial, the SHA-256 of the data, the base model's
//! revision and weight hash, the tokenizer and chat-template hashes, the
//! crate versions, the git commit, the libtorch version and the host;
//! `save_manifest` / `load_manifest` write and read it atomically, and
//! `verify_manifest` re-measures everything and names what drifted.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use lora_spec::contracts::orchestrator::ExperimentState;
use lora_spec::contracts::protocols::{
    Drift, DriftSeverity, Environment, FileHash, Manifest, ModelIdentity,
};
use lora_spec::experiment::ExperimentSpec;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ProtocolError;

/// Format version written by this build.
pub const MANIFEST_VERSION: u32 = 1;

/// The workspace crates whose versions are recorded.
const CRATES: [&str; 13] = [
    "lora-skill",
    "lora-spec",
    "lora-engine",
    "lora-dataset",
    "lora-config",
    "lora-training",
    "lora-eval",
    "lora-hpo",
    "lora-artifact",
    "lora-merge",
    "lora-protocols",
    "lora-orchestrator",
    "lora-cli",
];

fn hash_file_into(path: &Path, h: &mut Sha256) -> Result<u64, ProtocolError> {
    let mut f = std::fs::File::open(path).map_err(|e| ProtocolError::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| ProtocolError::io(path, e))?;
        if k == 0 {
            return Ok(n);
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) -> Result<(), ProtocolError> {
    for e in std::fs::read_dir(dir).map_err(|e| ProtocolError::io(dir, e))? {
        let e = e.map_err(|e| ProtocolError::io(dir, e))?;
        let p = e.path();
        if p.is_dir() {
            walk(&p, base, out)?;
        } else {
            out.push(p.strip_prefix(base).unwrap_or(&p).to_path_buf());
        }
    }
    Ok(())
}

/// SHA-256 of a file, or of a folder (relative paths and bytes, sorted), or
/// of the files of `dir` that `keep` accepts.
pub fn hash_path(
    path: &Path,
    keep: Option<&dyn Fn(&Path) -> bool>,
) -> Result<FileHash, ProtocolError> {
    let mut h = Sha256::new();
    let bytes = if path.is_dir() {
        let mut files = Vec::new();
        walk(path, path, &mut files)?;
        files.retain(|f| keep.is_none_or(|k| k(f)));
        files.sort();
        let mut n = 0;
        for f in files {
            let rel = f.to_string_lossy().replace('\\', "/");
            h.update((rel.len() as u64).to_le_bytes());
            h.update(rel.as_bytes());
            let mut fh = Sha256::new();
            n += hash_file_into(&path.join(&f), &mut fh)?;
            h.update(fh.finalize());
        }
        n
    } else {
        hash_file_into(path, &mut h)?
    };
    Ok(FileHash {
        path: path.display().to_string(),
        sha256: hex::encode(h.finalize()),
        bytes,
    })
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The Hugging Face hub cache folder (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`).
fn hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Where a model lives locally and its hub revision when known.
fn locate_model(name: &str) -> (Option<PathBuf>, Option<String>) {
    let p = PathBuf::from(name);
    if p.is_dir() {
        // A snapshot folder of the hub cache is named after its revision.
        let rev = p
            .parent()
            .filter(|q| q.file_name().is_some_and(|n| n == "snapshots"))
            .and_then(|_| p.file_name())
            .map(|n| n.to_string_lossy().to_string());
        return (Some(p), rev);
    }
    if lora_spec::experiment::looks_like_hub_id(name)
        && let Some(cache) = hub_cache()
    {
        let repo = cache.join(format!("models--{}", name.replace('/', "--")));
        if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
            let rev = rev.trim().to_string();
            let snap = repo.join("snapshots").join(&rev);
            return (snap.is_dir().then_some(snap), Some(rev));
        }
    }
    (None, None)
}

/// The base model's identity: revision, weights hash, tokenizer, chat template.
pub fn model_identity(name: &str) -> Result<ModelIdentity, ProtocolError> {
    let (dir, revision) = locate_model(name);
    let mut id = ModelIdentity {
        name: name.to_string(),
        revision,
        ..ModelIdentity::default()
    };
    let Some(dir) = dir else { return Ok(id) };
    let weights = |p: &Path| {
        let s = p.to_string_lossy();
        s.ends_with(".safetensors")
            || s.ends_with(".bin")
            || s.ends_with(".gguf")
            || s == "config.json"
    };
    id.weights = Some(hash_path(&dir, Some(&weights))?);
    for t in ["tokenizer.json", "tokenizer.model"] {
        let p = dir.join(t);
        if p.is_file() {
            id.tokenizer = Some(hash_path(&p, None)?);
            break;
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read(&jinja).map_err(|e| ProtocolError::io(&jinja, e))?;
        id.chat_template_sha256 = Some(sha_hex(&text));
    } else {
        let tc = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&tc) {
            let v: Value = serde_json::from_str(&text).map_err(|e| ProtocolError::Malformed {
                path: tc.clone(),
                line: e.line() as u64,
                message: e.to_string(),
            })?;
            if let Some(t) = v.get("chat_template").filter(|t| !t.is_null()) {
                let canon = match t {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                id.chat_template_sha256 = Some(sha_hex(canon.as_bytes()));
            }
        }
    }
    Ok(id)
}

fn git(args: &[&str], dir: &Path) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn libtorch_version() -> Option<String> {
    let root = PathBuf::from(std::env::var_os("LIBTORCH")?);
    if let Ok(v) = std::fs::read_to_string(root.join("build-version")) {
        return Some(v.trim().to_string());
    }
    // The PyPI wheel's torch folder: version.py has `__version__ = '2.x.y+cpu'`.
    let text = std::fs::read_to_string(root.join("version.py")).ok()?;
    text.lines()
        .find(|l| l.trim_start().starts_with("__version__"))
        .and_then(|l| l.split(['\'', '"']).nth(1))
        .map(String::from)
}

fn host() -> Option<String> {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
}

/// The environment of this process (git from `dir`).
pub fn environment(dir: &Path) -> Environment {
    let version = env!("CARGO_PKG_VERSION").to_string();
    Environment {
        crate_versions: CRATES
            .iter()
            .map(|c| (c.to_string(), version.clone()))
            .collect(),
        git_commit: git(&["rev-parse", "HEAD"], dir),
        git_dirty: git(&["status", "--porcelain", "--untracked-files=no"], dir)
            .map(|s| !s.is_empty()),
        libtorch_version: libtorch_version(),
        host: host(),
        platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    }
}

/// SHA-256 of the manifest's canonical JSON without `created_at` and `fingerprint`.
pub fn fingerprint(m: &Manifest) -> String {
    let mut m = m.clone();
    m.created_at.clear();
    m.fingerprint.clear();
    sha_hex(&serde_json::to_vec(&m).unwrap_or_default())
}

fn data_hash(path: &str, field: &str) -> Result<FileHash, ProtocolError> {
    let p = Path::new(path);
    if !p.exists() {
        return Err(ProtocolError::Io {
            path: p.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{field}: no such file or folder"),
            ),
        });
    }
    hash_path(p, None)
}

/// Seed 001's `create_manifest(spec, state, experiment_id)`.
pub fn create_manifest(
    spec: &ExperimentSpec,
    state: Option<&ExperimentState>,
    experiment_id: &str,
) -> Result<Manifest, ProtocolError> {
    let mut seeds = BTreeMap::new();
    seeds.insert("protocol".to_string(), spec.protocol.seed);
    seeds.insert("base_config".to_string(), spec.base_config.seed);
    let mut trials = BTreeMap::new();
    for t in state
        .map(|s| s.trial_history.as_slice())
        .unwrap_or_default()
    {
        seeds.insert(format!("trial_{}", t.trial_id), t.record.config.seed);
        trials.insert(t.trial_id.to_string(), t.record.config.normalized());
    }
    let dataset = Some(data_hash(&spec.dataset_path, "dataset_path")?);
    let eval_dataset = match &spec.eval_dataset_path {
        Some(p) => Some(data_hash(p, "eval_dataset_path")?),
        None => None,
    };
    let dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let mut m = Manifest {
        manifest_version: MANIFEST_VERSION,
        experiment_id: experiment_id.to_string(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        seeds,
        base_config: spec.base_config.normalized(),
        trials,
        dataset,
        eval_dataset,
        base_model: model_identity(&spec.base_model)?,
        environment: environment(&dir),
        spec: serde_json::to_value(spec).unwrap_or(Value::Null),
        fingerprint: String::new(),
    };
    m.fingerprint = fingerprint(&m);
    Ok(m)
}

/// Seed 001's `save_manifest(manifest, path)` (atomic).
pub fn save_manifest(m: &Manifest, path: &Path) -> Result<(), ProtocolError> {
    lora_skill::fs::write_json_atomic(path, m).map_err(|e| ProtocolError::io(path, e))
}

/// Reads a manifest (errors name the field and line).
pub fn load_manifest(path: &Path) -> Result<Manifest, ProtocolError> {
    let text = std::fs::read_to_string(path).map_err(|e| ProtocolError::io(path, e))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    decode_manifest(&mut de).map_err(|(line, message)| ProtocolError::Malformed {
        path: path.to_path_buf(),
        line,
        message,
    })
}

fn decode_manifest(
    de: &mut serde_json::Deserializer<serde_json::de::StrRead<'_>>,
) -> Result<Manifest, (u64, String)> {
    use serde::Deserialize;
    Manifest::deserialize(de).map_err(|e| (e.line() as u64, format!("not a manifest: {e}")))
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "(none)".into(), T::to_string)
}

fn push(
    out: &mut Vec<Drift>,
    field: &str,
    expected: String,
    actual: String,
    severity: DriftSeverity,
) {
    if expected != actual {
        out.push(Drift {
            field: field.into(),
            expected,
            actual,
            severity,
        });
    }
}

/// Re-measures the data, the model and the environment, and checks the
/// manifest against itself (fingerprint) and, when given, against the spec
/// about to run (seeds and hyper-parameters). Returns what drifted.
pub fn verify_manifest(m: &Manifest, current_spec: Option<&ExperimentSpec>) -> Vec<Drift> {
    use DriftSeverity::{Breaking, Warning};
    let mut d = Vec::new();
    push(
        &mut d,
        "fingerprint",
        m.fingerprint.clone(),
        fingerprint(m),
        Breaking,
    );
    for (field, fh) in [("dataset", &m.dataset), ("eval_dataset", &m.eval_dataset)] {
        if let Some(fh) = fh {
            let now = hash_path(Path::new(&fh.path), None)
                .map(|h| h.sha256)
                .unwrap_or_else(|e| format!("unreadable: {e}"));
            push(
                &mut d,
                &format!("{field}.sha256"),
                fh.sha256.clone(),
                now,
                Breaking,
            );
        }
    }
    match model_identity(&m.base_model.name) {
        Ok(now) => {
            let b = &m.base_model;
            push(
                &mut d,
                "base_model.revision",
                opt(&b.revision),
                opt(&now.revision),
                Breaking,
            );
            let w = |x: &Option<FileHash>| opt(&x.as_ref().map(|h| h.sha256.clone()));
            push(
                &mut d,
                "base_model.weights.sha256",
                w(&b.weights),
                w(&now.weights),
                Breaking,
            );
            push(
                &mut d,
                "base_model.tokenizer.sha256",
                w(&b.tokenizer),
                w(&now.tokenizer),
                Breaking,
            );
            push(
                &mut d,
                "base_model.chat_template_sha256",
                opt(&b.chat_template_sha256),
                opt(&now.chat_template_sha256),
                Breaking,
            );
        }
        Err(e) => push(
            &mut d,
            "base_model",
            m.base_model.name.clone(),
            format!("unreadable: {e}"),
            Breaking,
        ),
    }
    let dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let env = environment(&dir);
    let e = &m.environment;
    push(
        &mut d,
        "environment.git_commit",
        opt(&e.git_commit),
        opt(&env.git_commit),
        Warning,
    );
    push(
        &mut d,
        "environment.git_dirty",
        opt(&e.git_dirty),
        opt(&env.git_dirty),
        Warning,
    );
    push(
        &mut d,
        "environment.libtorch_version",
        opt(&e.libtorch_version),
        opt(&env.libtorch_version),
        Warning,
    );
    push(
        &mut d,
        "environment.host",
        opt(&e.host),
        opt(&env.host),
        Warning,
    );
    push(
        &mut d,
        "environment.platform",
        e.platform.clone(),
        env.platform.clone(),
        Warning,
    );
    for (k, v) in &e.crate_versions {
        push(
            &mut d,
            &format!("environment.crate_versions.{k}"),
            v.clone(),
            env.crate_versions
                .get(k)
                .cloned()
                .unwrap_or_else(|| "(none)".into()),
            Warning,
        );
    }
    if let Some(s) = current_spec {
        push(
            &mut d,
            "seeds.protocol",
            opt(&m.seeds.get("protocol")),
            s.protocol.seed.to_string(),
            Breaking,
        );
        let a = serde_json::to_value(&m.base_config).unwrap_or(Value::Null);
        let b = serde_json::to_value(s.base_config.normalized()).unwrap_or(Value::Null);
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                let vb = b.get(k).cloned().unwrap_or(Value::Null);
                push(
                    &mut d,
                    &format!("base_config.{k}"),
                    va.to_string(),
                    vb.to_string(),
                    Breaking,
                );
            }
        }
        if let Some(ds) = &m.dataset
            && Path::new(&s.dataset_path) != Path::new(&ds.path)
        {
            push(
                &mut d,
                "dataset.path",
                ds.path.clone(),
                s.dataset_path.clone(),
                Breaking,
            );
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_spec::contracts::hpo::TrialRecord;
    use lora_spec::contracts::orchestrator::TrialSummary;
    use lora_spec::trial::TrialConfig;

    fn spec(dir: &Path) -> ExperimentSpec {
        let data = dir.join("train.jsonl");
        std::fs::write(&data, "{\"instruction\": \"a\", \"output\": \"b\"}\n").unwrap();
        let model = dir.join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        std::fs::write(model.join("model.safetensors"), [1u8, 2, 3]).unwrap();
        std::fs::write(model.join("tokenizer.json"), "{\"v\": 1}").unwrap();
        std::fs::write(
            model.join("tokenizer_config.json"),
            "{\"chat_template\": \"{{ messages }}\"}",
        )
        .unwrap();
        let mut s: ExperimentSpec = serde_json::from_value(serde_json::json!({
            "goal": "test", "dataset_path": data.display().to_string(),
            "base_model": model.display().to_string(), "max_trials": 2, "budget_gpu_hours": 1.0
        }))
        .unwrap();
        s.protocol.seed = 7;
        s
    }

    fn state() -> ExperimentState {
        let t = |id: u32, seed: u64| TrialSummary {
            record: TrialRecord {
                config: TrialConfig {
                    trial_id: id,
                    seed,
                    ..TrialConfig::default()
                },
                objective: Some(1.0),
                status: "completed".into(),
                ..TrialRecord::default()
            },
            trial_id: id,
            role: Default::default(),
            rationale: String::new(),
            predicted_gpu_hours: None,
            training_steps: 0,
            final_loss: None,
            eval: None,
            adapter_path: None,
            output_dir: None,
            artifact: None,
            failure: None,
            diverged: false,
            dollars: None,
            resumed: 0,
        };
        ExperimentState {
            trial_history: vec![t(1, 11), t(2, 12)],
            ..ExperimentState::default()
        }
    }

    #[test]
    fn create_save_load_verify_and_name_the_drift() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let m = create_manifest(&s, Some(&state()), "exp_001").unwrap();
        assert_eq!(m.seeds["protocol"], 7);
        assert_eq!(m.seeds["trial_2"], 12);
        assert_eq!(m.trials.len(), 2);
        assert_eq!(m.dataset.as_ref().unwrap().sha256.len(), 64);
        let bm = &m.base_model;
        assert!(bm.weights.is_some() && bm.tokenizer.is_some());
        assert_eq!(
            bm.chat_template_sha256.as_deref(),
            Some(sha_hex(b"{{ messages }}").as_str())
        );
        assert!(m.environment.crate_versions.contains_key("lora-hpo"));
        let path = dir.path().join("experiment_manifest.json");
        save_manifest(&m, &path).unwrap();
        let back = load_manifest(&path).unwrap();
        assert_eq!(back, m);
        assert!(
            verify_manifest(&back, Some(&s))
                .iter()
                .all(|d| d.severity == DriftSeverity::Warning)
        );
        // Change the data, the tokenizer and the seed: each is named.
        std::fs::write(
            &s.dataset_path,
            "{\"instruction\": \"a\", \"output\": \"c\"}\n",
        )
        .unwrap();
        std::fs::write(
            Path::new(&s.base_model).join("tokenizer.json"),
            "{\"v\": 2}",
        )
        .unwrap();
        let mut s2 = s.clone();
        s2.protocol.seed = 8;
        s2.base_config.lora_rank = 32;
        let drift = verify_manifest(&back, Some(&s2));
        let fields: Vec<&str> = drift.iter().map(|d| d.field.as_str()).collect();
        for f in [
            "dataset.sha256",
            "base_model.tokenizer.sha256",
            "seeds.protocol",
            "base_config.lora_rank",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        assert!(!fields.contains(&"base_model.weights.sha256"));
        // An edited manifest is caught by its fingerprint.
        let mut edited = back.clone();
        edited.seeds.insert("protocol".into(), 99);
        assert!(
            verify_manifest(&edited, None)
                .iter()
                .any(|d| d.field == "fingerprint")
        );
        std::fs::write(&path, "{\"manifest_version\": \"x\"}").unwrap();
        assert!(matches!(
            load_manifest(&path),
            Err(ProtocolError::Malformed { .. })
        ));
    }

    #[test]
    fn a_missing_dataset_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.dataset_path = dir.path().join("nope.jsonl").display().to_string();
        let e = create_manifest(&s, None, "x").unwrap_err();
        assert!(e.to_string().contains("nope.jsonl"), "{e}");
    }
}

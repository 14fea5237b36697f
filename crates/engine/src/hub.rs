//! Model names: a local folder, a model imported into the project cache
//! (`<cache>/models/<name>`), or a Hugging Face hub id (`org/name[@revision]`)
//! found in the local Hugging Face cache (`models--org--name/snapshots/<rev>`),
//! read with hf-hub's cache layout code. Resolution is offline: nothing is
//! downloaded.

use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};

/// The project's cache shared by every clone: `${XDG_CACHE_HOME:-$HOME/.cache}/lora-trainer`.
pub fn project_cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("lora-trainer"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lora-trainer"))
}

/// The default base model imported by `cargo xtask setup`.
pub fn default_model_dir() -> Option<PathBuf> {
    project_cache_dir().map(|c| c.join("models/SmolLM2-135M-Instruct"))
}

/// The Hugging Face hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/huggingface/hub`.
pub fn hf_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE") {
        return Some(p);
    }
    if let Some(p) = var("HF_HOME") {
        return Some(p.join("hub"));
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Some(p.join("huggingface/hub"));
    }
    var("HOME").map(|h| h.join(".cache/huggingface/hub"))
}

/// Whether `name` reads as a hub id (`org/name`, optionally `@revision`).
fn hub_id(name: &str) -> Option<(&str, &str)> {
    let (id, rev) = name.split_once('@').unwrap_or((name, "main"));
    let mut parts = id.split('/');
    let ok = matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None)
        if !a.is_empty() && !b.is_empty() && !a.starts_with('.') && !rev.is_empty());
    ok.then_some((id, rev))
}

/// Finds the snapshot folder of `repo_id` at `revision` (a branch, tag or
/// commit) in the hub cache at `cache`.
pub fn find_in_hf_cache(cache: &Path, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let c = hf_hub_cache::Cache::new(cache.to_path_buf());
    let repo = hf_hub_cache::Repo::with_revision(
        repo_id.to_owned(),
        hf_hub_cache::RepoType::Model,
        revision.to_owned(),
    );
    if let Some(cfg) = c.repo(repo).get("config.json") {
        return cfg.parent().map(Path::to_path_buf);
    }
    // Lenient about a trailing newline in refs/<rev>, and about a commit hash.
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| revision.to_owned());
    let snap = repo_dir.join("snapshots").join(commit);
    snap.join("config.json").is_file().then_some(snap)
}

/// Resolves a model name to a folder holding config.json.
pub fn resolve_model(name: &str) -> Result<PathBuf> {
    let p = Path::new(name);
    if p.is_dir() {
        if p.join("config.json").is_file() {
            return Ok(p.to_path_buf());
        }
        return Err(EngineError::NotFound {
            what: format!("config.json in {}", p.display()),
            hint: Some(
                "a model folder holds config.json, safetensors weights and tokenizer.json".into(),
            ),
        });
    }
    if p.is_file() {
        let hint = if name.ends_with(".gguf") {
            format!("import it first: lora-trainer model import {name} --out DIR")
        } else {
            "pass the model's folder, not a file in it".into()
        };
        return Err(EngineError::NotFound {
            what: format!("a model folder at {name} (it is a file)"),
            hint: Some(hint),
        });
    }
    if !name.contains('/')
        && let Some(dir) = project_cache_dir().map(|c| c.join("models").join(name))
        && dir.join("config.json").is_file()
    {
        return Ok(dir);
    }
    if let Some((id, rev)) = hub_id(name) {
        let cache = hf_cache_dir();
        if let Some(dir) = cache.as_deref().and_then(|c| find_in_hf_cache(c, id, rev)) {
            return Ok(dir);
        }
        return Err(EngineError::NotFound {
            what: format!(
                "model `{id}` (revision {rev}) in the Hugging Face cache {}",
                cache
                    .map(|c| c.display().to_string())
                    .unwrap_or_else(|| "(no HOME)".into())
            ),
            hint: Some(format!(
                "download it once (e.g. `huggingface-cli download {id}`) or pass a local folder; resolution is offline"
            )),
        });
    }
    Err(EngineError::NotFound {
        what: format!("model `{name}`: no such folder"),
        hint: Some("pass a model folder, an imported model's name, or a hub id `org/name` already in the HF cache".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_cache() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--org--tiny");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        std::fs::write(repo.join("refs/v1"), "abc123\n").unwrap();
        root
    }

    #[test]
    fn finds_snapshots_by_branch_tag_and_commit() {
        let c = fake_cache();
        let want = c.path().join("models--org--tiny/snapshots/abc123");
        assert_eq!(
            find_in_hf_cache(c.path(), "org/tiny", "main"),
            Some(want.clone())
        );
        assert_eq!(
            find_in_hf_cache(c.path(), "org/tiny", "v1"),
            Some(want.clone())
        );
        assert_eq!(find_in_hf_cache(c.path(), "org/tiny", "abc123"), Some(want));
        assert_eq!(find_in_hf_cache(c.path(), "org/other", "main"), None);
    }

    #[test]
    fn names_resolve_or_explain() {
        assert_eq!(hub_id("org/name@v2"), Some(("org/name", "v2")));
        assert_eq!(hub_id("a/b/c"), None);
        assert_eq!(hub_id("./x"), None);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        assert_eq!(resolve_model(d.path().to_str().unwrap()).unwrap(), d.path());
        let f = d.path().join("m.gguf");
        std::fs::write(&f, "x").unwrap();
        let err = format!("{:?}", resolve_model(f.to_str().unwrap()).unwrap_err());
        assert!(err.contains("model import"), "{err}");
        let err = resolve_model("no-such-org/no-such-model-xyz")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Hugging Face cache"), "{err}");
    }
}

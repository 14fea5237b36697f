//! Finding and loading a tokenizer: a `tokenizer.json`, a model folder, or a hub id
//! already present in the local Hugging Face cache (looked up offline with `hf-hub`).

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::error::{DatasetError, Result};

/// A loaded tokenizer and where it came from.
pub struct LoadedTokenizer {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The `tokenizer.json` it was read from.
    pub file: PathBuf,
    /// The folder holding it (with `tokenizer_config.json`, when the model has one).
    pub dir: PathBuf,
}

impl std::fmt::Debug for LoadedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedTokenizer")
            .field("file", &self.file)
            .finish()
    }
}

/// The Hugging Face hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (what `huggingface_hub` uses).
pub fn default_hf_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    hf_hub_cache::Cache::from_env().path().clone()
}

fn looks_like_hub_id(name: &str) -> bool {
    let n = name.split('@').next().unwrap_or(name);
    let parts: Vec<&str> = n.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with('.')
        })
}

/// Finds a file of a model in the local hub cache (`models--org--name/snapshots/<rev>/file`),
/// offline. `id` may carry a revision as `org/name@rev`.
pub fn find_in_hf_cache(cache: &Path, id: &str, file: &str) -> Option<PathBuf> {
    let (repo, rev) = match id.split_once('@') {
        Some((r, v)) => (r, Some(v)),
        None => (id, None),
    };
    let c = hf_hub_cache::Cache::new(cache.to_path_buf());
    let r = match rev {
        Some(v) => hf_hub_cache::Repo::with_revision(
            repo.to_string(),
            hf_hub_cache::RepoType::Model,
            v.to_string(),
        ),
        None => hf_hub_cache::Repo::model(repo.to_string()),
    };
    c.repo(r).get(file)
}

/// Resolves and loads `name` (relative paths against `base`; hub ids in `hf_cache`,
/// default [`default_hf_cache`]).
pub fn load_tokenizer(name: &str, base: &Path, hf_cache: Option<&Path>) -> Result<LoadedTokenizer> {
    let p = if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        base.join(name)
    };
    let file = if p.is_file() {
        p
    } else if p.is_dir() {
        let f = p.join("tokenizer.json");
        if !f.is_file() {
            return Err(DatasetError::Tokenizer {
                name: name.to_string(),
                message: format!("the folder {} has no tokenizer.json", p.display()),
                hint: "point at a folder saved by tokenizer.save_pretrained (fast tokenizers write tokenizer.json)".into(),
            });
        }
        f
    } else if looks_like_hub_id(name) {
        let cache = hf_cache.map_or_else(default_hf_cache, Path::to_path_buf);
        find_in_hf_cache(&cache, name, "tokenizer.json").ok_or_else(|| DatasetError::Tokenizer {
            name: name.to_string(),
            message: format!(
                "not a local path, and not in the Hugging Face cache at {} (offline lookup)",
                cache.display()
            ),
            hint: format!(
                "download it once: `huggingface-cli download {} tokenizer.json tokenizer_config.json`, or pass a path to tokenizer.json",
                name.split('@').next().unwrap_or(name)
            ),
        })?
    } else {
        return Err(DatasetError::Tokenizer {
            name: name.to_string(),
            message: format!("{} does not exist", p.display()),
            hint: "give a tokenizer.json, a model folder, or a hub id such as HuggingFaceTB/SmolLM2-135M".into(),
        });
    };
    let tokenizer = Tokenizer::from_file(&file).map_err(|e| DatasetError::Tokenizer {
        name: name.to_string(),
        message: format!("cannot load {}: {e}", file.display()),
        hint: "the file must be a Hugging Face tokenizers JSON (tokenizer.json)".into(),
    })?;
    let dir = file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    Ok(LoadedTokenizer {
        tokenizer,
        file,
        dir,
    })
}

/// Counts tokens of `text` without special tokens; `None` when the tokenizer fails on it.
pub fn count_tokens(tok: &Tokenizer, text: &str) -> Option<u64> {
    tok.encode_fast(text, false).ok().map(|e| e.len() as u64)
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A tiny real tokenizer (word level, whitespace split) for tests.

    use std::path::Path;

    /// Writes a word-level tokenizer.json knowing `words` plus the given special tokens.
    pub(crate) fn write_word_tokenizer(path: &Path, words: &[&str], specials: &[&str]) {
        let mut vocab = serde_json::Map::new();
        vocab.insert("[UNK]".into(), 0.into());
        let mut added = Vec::new();
        let mut id = 1u64;
        for s in specials {
            vocab.insert((*s).into(), id.into());
            added.push(
                serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}),
            );
            id += 1;
        }
        for w in words {
            if !vocab.contains_key(*w) {
                vocab.insert((*w).into(), id.into());
                id += 1;
            }
        }
        let j = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        std::fs::write(path, serde_json::to_vec(&j).unwrap()).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::write_word_tokenizer;
    use super::*;

    #[test]
    fn loads_file_folder_and_fake_hub_cache() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir_all(&model).unwrap();
        write_word_tokenizer(
            &model.join("tokenizer.json"),
            &["hello", "world"],
            &["</s>"],
        );

        let t = load_tokenizer("model/tokenizer.json", dir.path(), None).unwrap();
        assert_eq!(count_tokens(&t.tokenizer, "hello world hello"), Some(3));
        let t = load_tokenizer("model", dir.path(), None).unwrap();
        assert_eq!(t.dir, model);

        // Hub cache layout: models--org--name/{refs/main, snapshots/<hash>/tokenizer.json}.
        let cache = dir.path().join("hub");
        let repo = cache.join("models--acme--tiny-lm");
        let snap = repo.join("snapshots").join("0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
        write_word_tokenizer(&snap.join("tokenizer.json"), &["a", "b"], &[]);
        let t = load_tokenizer("acme/tiny-lm", dir.path(), Some(&cache)).unwrap();
        assert_eq!(t.file, snap.join("tokenizer.json"));
        assert_eq!(count_tokens(&t.tokenizer, "a b c"), Some(3));

        let e = load_tokenizer("acme/missing", dir.path(), Some(&cache)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("not in the Hugging Face cache"), "{msg}");
        let e = load_tokenizer("./nope.json", dir.path(), Some(&cache)).unwrap_err();
        assert!(e.to_string().contains("does not exist"));
    }
}

//! The text side of a model folder: `tokenizer.json` through the `tokenizers`
//! crate, special tokens and the chat template from `tokenizer_config.json`
//! (rendered with minijinja configured like transformers' jinja2), and the
//! end-of-sequence ids from `generation_config.json` / `config.json`.

use crate::error::{EngineError, Result};
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind, Value};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A turn of `role`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }
}

/// A tokenizer with its special tokens and chat template.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// The Jinja chat template, when the model has one.
    pub chat_template: Option<String>,
    /// Beginning-of-sequence token text.
    pub bos_token: Option<String>,
    /// End-of-sequence token text.
    pub eos_token: Option<String>,
    /// Padding token text.
    pub pad_token: Option<String>,
    /// Unknown token text.
    pub unk_token: Option<String>,
    /// Ids that end generation (generation_config.json, config.json, the eos token).
    pub eos_token_ids: Vec<i64>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => {
            o.get("content").and_then(|c| c.as_str()).map(str::to_owned)
        }
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::json(path, &e))
}

fn ids_of(v: Option<&serde_json::Value>) -> Vec<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => Vec::new(),
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
    /// `generation_config.json` and `config.json` (all but the first optional).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(EngineError::NotFound {
                what: format!("{}", path.display()),
                hint: Some(
                    "the model folder needs a tokenizer.json (fast tokenizer); convert a slow tokenizer with transformers".into(),
                ),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::format(&path, format!("not a tokenizer.json: {e}")))?;
        let cfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let mut chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| EngineError::io(&jinja, e))?);
        }
        let eos_token = token_text(cfg.get("eos_token"));
        let mut eos_token_ids = Vec::new();
        for file in ["generation_config.json", "config.json"] {
            if let Some(v) = read_json(&dir.join(file))? {
                for id in ids_of(v.get("eos_token_id")) {
                    if !eos_token_ids.contains(&id) {
                        eos_token_ids.push(id);
                    }
                }
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            let id = i64::from(id);
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        Ok(Self {
            inner,
            chat_template,
            bos_token: token_text(cfg.get("bos_token")),
            eos_token,
            pad_token: token_text(cfg.get("pad_token")),
            unk_token: token_text(cfg.get("unk_token")),
            eos_token_ids,
        })
    }

    /// Wraps a `tokenizers` tokenizer without config files.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            unk_token: None,
            eos_token_ids: Vec::new(),
        }
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (BOS...).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::invalid("text", format!("tokenization failed: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Text of `ids`; `skip_special_tokens` drops special tokens.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| {
                u32::try_from(i)
                    .map_err(|_| EngineError::invalid("ids", format!("{i} is not a token id")))
            })
            .collect::<Result<_>>()?;
        self.inner
            .decode(&ids, skip_special_tokens)
            .map_err(|e| EngineError::invalid("ids", format!("decoding failed: {e}")))
    }

    /// The id of a token's text.
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// Renders chat turns as transformers' `apply_chat_template(messages,
    /// tokenize=False, add_generation_prompt=...)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(source) = &self.chat_template else {
            return Err(EngineError::unsupported(
                "this model has no chat template",
                Some(
                    "pass the prompt as plain text (without --chat), or add chat_template to tokenizer_config.json",
                ),
            ));
        };
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::invalid("chat_template", e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template("chat", source)
            .map_err(|e| EngineError::invalid("chat_template", format!("does not compile: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| EngineError::invalid("chat_template", e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            tools => Value::from(()),
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
            pad_token => self.pad_token.clone(),
            unk_token => self.unk_token.clone(),
        };
        tmpl.render(ctx).map_err(|e| {
            EngineError::invalid("messages", format!("the chat template rejected them: {e}"))
        })
    }

    /// Token ids of a rendered chat (as `apply_chat_template(tokenize=True)`:
    /// the template supplies the special tokens).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<i64>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(JinjaErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if write!(out, "{}", chrono::Utc::now().format(&fmt)).is_err() {
        return fmt;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::tiny_models;

    #[test]
    fn reads_special_tokens_template_and_round_trips_text() {
        let tok = TextTokenizer::from_dir(&tiny_models().join("llama")).unwrap();
        assert_eq!(tok.eos_token.as_deref(), Some("<|eos|>"));
        assert_eq!(tok.eos_token_ids, vec![2]);
        let ids = tok.encode("the quick brown fox", false).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), "the quick brown fox");
        let chat = tok
            .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
            .unwrap();
        assert_eq!(chat, "<|bos|>user\nhi<|eos|>\n<|bos|>assistant\n");
        let ids = tok
            .encode_chat(&[ChatMessage::new("user", "hi")], true)
            .unwrap();
        assert_eq!(ids[0], 1);
    }

    #[test]
    fn a_missing_tokenizer_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}

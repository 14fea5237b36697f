//! The tokenizer embedded in a GGUF file (`tokenizer.ggml.*`, gguf-py
//! `constants.py` `Keys.Tokenizer`, llama.cpp `src/llama-vocab.cpp`).
//!
//! - GPT-2 style byte-level BPE (`tokenizer.json` model `BPE` with a ByteLevel
//!   pre-tokenizer: Llama 3, Qwen2, SmolLM…) → `tokenizer.ggml.model = "gpt2"`
//!   with tokens, token types and merges, and a `tokenizer.ggml.pre` recognised
//!   from the pre-tokenizer's regex.
//! - SentencePiece (`tokenizer.model`: Llama 2, Mistral ≤ v0.3) → `"llama"` with
//!   pieces, scores and types read from the protobuf.
//!
//! Special-token ids, add_bos/add_eos and the chat template come from
//! `tokenizer_config.json` (or `chat_template.jinja`) and `config.json`.

use super::writer::Value;
use crate::error::{MergeError, Result, read_json};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// gguf token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The tokenizer metadata for a GGUF file, and what was found.
#[derive(Debug, Clone, Default)]
pub struct TokenizerKv {
    /// The key/values to write.
    pub kvs: Vec<(String, Value)>,
    /// Number of tokens written (after padding).
    pub n_tokens: usize,
    /// Tokens the tokenizer defines (before padding).
    pub n_defined: usize,
    /// Whether a chat template was embedded.
    pub has_chat_template: bool,
    /// `tokenizer.ggml.pre`, for BPE.
    pub pre: Option<String>,
    /// Notes for the user (unrecognised pre-tokenizer, padding…).
    pub warnings: Vec<String>,
}

fn token_str(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(String::from),
        _ => None,
    }
}

/// The chat template of a model folder: `chat_template.jinja`, else
/// `tokenizer_config.json` `chat_template` (a string, or the `default` of a list).
pub fn chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| MergeError::io(&jinja, e));
    }
    let tc = dir.join("tokenizer_config.json");
    if !tc.is_file() {
        return Ok(None);
    }
    let v = read_json(&tc)?;
    Ok(match v.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(String::from),
        _ => None,
    })
}

/// Recognises llama.cpp's pre-tokenizer name from a `tokenizer.json` pre_tokenizer.
fn detect_pre(pre: &Json) -> Option<&'static str> {
    let text = pre.to_string();
    let has = |s: &str| text.contains(s);
    let byte_level = has("\"ByteLevel\"");
    if has("\\\\p{N}{1,3}") && has("(?i:'s|'t|'re|'ve|'m|'ll|'d)") {
        return Some("llama-bpe");
    }
    if has("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}|") {
        return Some("qwen2");
    }
    if byte_level && has("\"Digits\"") && has("\"individual_digits\":true") {
        return Some("smollm");
    }
    let only_byte_level = match pre.get("type").and_then(Json::as_str) {
        Some("ByteLevel") => true,
        Some("Sequence") => pre
            .get("pretokenizers")
            .and_then(Json::as_array)
            .is_some_and(|a| {
                a.len() == 1 && a[0].get("type").and_then(Json::as_str) == Some("ByteLevel")
            }),
        _ => false,
    };
    if only_byte_level && !has("\"use_regex\":false") {
        return Some("gpt-2");
    }
    None
}

/// Builds the tokenizer metadata of the model folder `dir` for an embedding table of
/// `n_vocab` rows. `config` is the model's config.json.
pub fn tokenizer_kvs(dir: &Path, n_vocab: usize, config: &Json) -> Result<TokenizerKv> {
    let mut out = TokenizerKv::default();
    let spm = dir.join("tokenizer.model");
    let tj = dir.join("tokenizer.json");
    let mut ids: HashMap<String, u32> = HashMap::new();
    if spm.is_file() {
        let pieces = read_sentencepiece(&spm)?;
        if pieces.len() > n_vocab {
            return Err(vocab_too_big(&spm, pieces.len(), n_vocab));
        }
        let mut tokens = Vec::with_capacity(n_vocab);
        let mut scores = Vec::with_capacity(n_vocab);
        let mut types = Vec::with_capacity(n_vocab);
        for (i, (p, s, t)) in pieces.iter().enumerate() {
            ids.insert(p.clone(), i as u32);
            tokens.push(p.clone());
            scores.push(*s);
            types.push(*t);
        }
        // added_tokens.json / tokenizer.json added tokens beyond the SPM pieces.
        if tj.is_file() {
            let v = read_json(&tj)?;
            for t in v
                .get("added_tokens")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                let (Some(id), Some(content)) = (
                    t.get("id").and_then(Json::as_u64),
                    t.get("content").and_then(Json::as_str),
                ) else {
                    continue;
                };
                let id = id as usize;
                if id >= n_vocab {
                    return Err(vocab_too_big(&tj, id + 1, n_vocab));
                }
                while tokens.len() <= id {
                    let k = tokens.len();
                    tokens.push(format!("[PAD{k}]"));
                    scores.push(-1000.0);
                    types.push(UNUSED);
                }
                tokens[id] = content.to_string();
                scores[id] = -1000.0;
                types[id] = if t.get("special").and_then(Json::as_bool).unwrap_or(false) {
                    CONTROL
                } else {
                    USER_DEFINED
                };
                ids.insert(content.to_string(), id as u32);
            }
        }
        out.n_defined = tokens.len();
        while tokens.len() < n_vocab {
            let k = tokens.len();
            tokens.push(format!("[PAD{k}]"));
            scores.push(-1000.0);
            types.push(UNUSED);
        }
        out.kvs
            .push(("tokenizer.ggml.model".into(), Value::Str("llama".into())));
        out.kvs
            .push(("tokenizer.ggml.pre".into(), Value::Str("default".into())));
        out.kvs
            .push(("tokenizer.ggml.tokens".into(), Value::ArrStr(tokens)));
        out.kvs
            .push(("tokenizer.ggml.scores".into(), Value::ArrF32(scores)));
        out.kvs
            .push(("tokenizer.ggml.token_type".into(), Value::ArrI32(types)));
    } else if tj.is_file() {
        let v = read_json(&tj)?;
        let model = v.get("model").cloned().unwrap_or(Json::Null);
        let mtype = model.get("type").and_then(Json::as_str).unwrap_or("");
        if mtype != "BPE"
            || model
                .get("byte_fallback")
                .and_then(Json::as_bool)
                .unwrap_or(false)
        {
            return Err(MergeError::unsupported(
                format!(
                    "{}: tokenizer model `{mtype}`{} cannot be embedded in GGUF by this tool",
                    tj.display(),
                    if mtype == "BPE" {
                        " with byte_fallback (SentencePiece-converted)"
                    } else {
                        ""
                    }
                ),
                "byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM) and SentencePiece tokenizer.model files are supported; \
                 put the model's tokenizer.model beside tokenizer.json",
            ));
        }
        let vocab = model
            .get("vocab")
            .and_then(Json::as_object)
            .ok_or_else(|| MergeError::bad_file(&tj, "model.vocab is missing"))?;
        let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
        let mut types = vec![NORMAL; n_vocab];
        let mut place = |tok: &str,
                         id: u64,
                         ty: i32,
                         tokens: &mut Vec<Option<String>>,
                         types: &mut Vec<i32>|
         -> Result<()> {
            let id = id as usize;
            if id >= n_vocab {
                return Err(vocab_too_big(&tj, id + 1, n_vocab));
            }
            tokens[id] = Some(tok.to_string());
            types[id] = ty;
            ids.insert(tok.to_string(), id as u32);
            Ok(())
        };
        for (tok, id) in vocab {
            let id = id.as_u64().ok_or_else(|| {
                MergeError::bad_file(&tj, format!("vocab id of `{tok}` is not an integer"))
            })?;
            place(tok, id, NORMAL, &mut tokens, &mut types)?;
        }
        for t in v
            .get("added_tokens")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(content)) = (
                t.get("id").and_then(Json::as_u64),
                t.get("content").and_then(Json::as_str),
            ) else {
                continue;
            };
            let special = t.get("special").and_then(Json::as_bool).unwrap_or(false);
            place(
                content,
                id,
                if special { CONTROL } else { USER_DEFINED },
                &mut tokens,
                &mut types,
            )?;
        }
        out.n_defined = tokens.iter().filter(|t| t.is_some()).count();
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.unwrap_or_else(|| {
                    types[i] = UNUSED;
                    format!("[PAD{i}]")
                })
            })
            .collect();
        let merges: Vec<String> = model
            .get("merges")
            .and_then(Json::as_array)
            .map(|m| {
                m.iter()
                    .filter_map(|x| match x {
                        Json::String(s) => Some(s.clone()),
                        Json::Array(p) if p.len() == 2 => {
                            Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if merges.is_empty() {
            return Err(MergeError::bad_file(
                &tj,
                "the BPE tokenizer has no merges; llama.cpp refuses a gpt2 vocabulary without them",
            ));
        }
        let pre = match v.get("pre_tokenizer").and_then(detect_pre) {
            Some(p) => p.to_string(),
            None => {
                out.warnings.push(format!(
                    "{}: pre-tokenizer not recognised; writing tokenizer.ggml.pre=\"default\" (llama.cpp may split text differently from transformers)",
                    tj.display()
                ));
                "default".to_string()
            }
        };
        out.pre = Some(pre.clone());
        out.kvs
            .push(("tokenizer.ggml.model".into(), Value::Str("gpt2".into())));
        out.kvs.push(("tokenizer.ggml.pre".into(), Value::Str(pre)));
        out.kvs
            .push(("tokenizer.ggml.tokens".into(), Value::ArrStr(tokens)));
        out.kvs
            .push(("tokenizer.ggml.token_type".into(), Value::ArrI32(types)));
        out.kvs
            .push(("tokenizer.ggml.merges".into(), Value::ArrStr(merges)));
    } else {
        return Err(MergeError::NotFound {
            message: format!("no tokenizer in {} (tokenizer.json or tokenizer.model)", dir.display()),
            file: Some(tj),
            hint: Some("a GGUF file carries its tokenizer: copy the base model's tokenizer files into the model folder".into()),
        });
    }
    out.n_tokens = n_vocab;
    if out.n_defined < n_vocab {
        out.warnings.push(format!(
            "the tokenizer defines {} tokens, the embedding has {n_vocab} rows: padded with [PAD<i>] (unused) tokens",
            out.n_defined
        ));
    }
    // Special tokens.
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        Json::Null
    };
    let stm_path = dir.join("special_tokens_map.json");
    let stm = if stm_path.is_file() {
        read_json(&stm_path)?
    } else {
        Json::Null
    };
    let lookup = |key: &str| -> Option<u32> {
        let s = tc
            .get(key)
            .and_then(token_str)
            .or_else(|| stm.get(key).and_then(token_str))?;
        ids.get(&s).copied()
    };
    let cfg_id = |key: &str| -> Option<u32> {
        match config.get(key) {
            Some(Json::Number(n)) => n.as_u64().map(|x| x as u32),
            Some(Json::Array(a)) => a.first().and_then(Json::as_u64).map(|x| x as u32),
            _ => None,
        }
    };
    for (name, cfg_key) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unknown", ""),
        ("padding", "pad_token_id"),
    ] {
        let tc_key = match name {
            "unknown" => "unk_token",
            "padding" => "pad_token",
            other => {
                if other == "bos" {
                    "bos_token"
                } else {
                    "eos_token"
                }
            }
        };
        let id = lookup(tc_key).or_else(|| {
            if cfg_key.is_empty() {
                None
            } else {
                cfg_id(cfg_key)
            }
        });
        if let Some(id) = id.filter(|&i| (i as usize) < n_vocab) {
            out.kvs
                .push((format!("tokenizer.ggml.{name}_token_id"), Value::U32(id)));
        }
    }
    for (key, gg) in [
        ("add_bos_token", "tokenizer.ggml.add_bos_token"),
        ("add_eos_token", "tokenizer.ggml.add_eos_token"),
    ] {
        if let Some(b) = tc.get(key).and_then(Json::as_bool) {
            out.kvs.push((gg.into(), Value::Bool(b)));
        }
    }
    if let Some(t) = chat_template(dir)? {
        out.kvs
            .push(("tokenizer.chat_template".into(), Value::Str(t)));
        out.has_chat_template = true;
    }
    Ok(out)
}

fn vocab_too_big(file: &Path, n: usize, rows: usize) -> MergeError {
    MergeError::BadFile {
        file: file.to_path_buf(),
        message: format!("the tokenizer has {n} tokens but the embedding table has only {rows} rows"),
        hint: Some(
            "the tokenizer does not belong to these weights (added tokens without resize_token_embeddings?); \
             export with the tokenizer the model was trained with"
                .into(),
        ),
    }
}

/// Reads (piece, score, type) of a SentencePiece `ModelProto` (field 1: repeated
/// `SentencePiece { piece = 1; score = 2; type = 3 }`).
pub fn read_sentencepiece(path: &Path) -> Result<Vec<(String, f32, i32)>> {
    let buf = std::fs::read(path).map_err(|e| MergeError::io(path, e))?;
    let bad = || MergeError::bad_file(path, "not a SentencePiece model (protobuf parse failed)");
    let mut out = Vec::new();
    let mut p = Pb { b: &buf, i: 0 };
    while !p.done() {
        let (field, wt) = p.key().ok_or_else(bad)?;
        if field == 1 && wt == 2 {
            let msg = p.bytes().ok_or_else(bad)?;
            let mut q = Pb { b: msg, i: 0 };
            let (mut piece, mut score, mut ty) = (String::new(), 0f32, NORMAL);
            while !q.done() {
                let (f, w) = q.key().ok_or_else(bad)?;
                match (f, w) {
                    (1, 2) => {
                        piece = String::from_utf8_lossy(q.bytes().ok_or_else(bad)?).into_owned()
                    }
                    (2, 5) => score = f32::from_le_bytes(q.fixed32().ok_or_else(bad)?),
                    (3, 0) => ty = q.varint().ok_or_else(bad)? as i32,
                    _ => q.skip(w).ok_or_else(bad)?,
                }
            }
            // SentencePiece types: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6 (gguf uses the same numbers).
            if !(1..=6).contains(&ty) {
                ty = NORMAL;
            }
            let _ = UNKNOWN;
            out.push((piece, score, ty));
        } else {
            p.skip(wt).ok_or_else(bad)?;
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

struct Pb<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Pb<'a> {
    fn done(&self) -> bool {
        self.i >= self.b.len()
    }
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.i)?;
            self.i += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn key(&mut self) -> Option<(u64, u64)> {
        let k = self.varint()?;
        Some((k >> 3, k & 7))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.varint()? as usize;
        let s = self.b.get(self.i..self.i.checked_add(n)?)?;
        self.i += n;
        Some(s)
    }
    fn fixed32(&mut self) -> Option<[u8; 4]> {
        let s = self.b.get(self.i..self.i + 4)?;
        self.i += 4;
        Some([s[0], s[1], s[2], s[3]])
    }
    fn skip(&mut self, wt: u64) -> Option<()> {
        match wt {
            0 => self.varint().map(|_| ()),
            1 => {
                self.i += 8;
                (self.i <= self.b.len()).then_some(())
            }
            2 => self.bytes().map(|_| ()),
            5 => self.fixed32().map(|_| ()),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pb_piece(piece: &str, score: f32, ty: u8) -> Vec<u8> {
        let mut m = vec![0x0a, piece.len() as u8];
        m.extend_from_slice(piece.as_bytes());
        m.push(0x15);
        m.extend_from_slice(&score.to_le_bytes());
        m.extend_from_slice(&[0x18, ty]);
        let mut out = vec![0x0a, m.len() as u8];
        out.extend(m);
        out
    }

    #[test]
    fn reads_sentencepiece_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = pb_piece("<unk>", 0.0, 2);
        buf.extend(pb_piece("<s>", 0.0, 3));
        buf.extend(pb_piece("▁the", -1.5, 1));
        buf.extend([0x12, 0x02, 0x08, 0x01]); // trainer_spec-like field 2 to skip
        let p = dir.path().join("tokenizer.model");
        std::fs::write(&p, &buf).unwrap();
        let pieces = read_sentencepiece(&p).unwrap();
        assert_eq!(
            pieces,
            vec![
                ("<unk>".into(), 0.0, 2),
                ("<s>".into(), 0.0, 3),
                ("▁the".into(), -1.5, 1)
            ]
        );
        let kv = tokenizer_kvs(dir.path(), 5, &serde_json::json!({"bos_token_id": 1})).unwrap();
        assert_eq!(kv.n_defined, 3);
        assert!(
            kv.kvs
                .iter()
                .any(|(k, v)| k == "tokenizer.ggml.bos_token_id" && *v == Value::U32(1))
        );
        let err = tokenizer_kvs(dir.path(), 2, &Json::Null).unwrap_err();
        assert!(err.to_string().contains("only 2 rows"), "{err}");
    }

    #[test]
    fn recognises_pre_tokenizers() {
        let gpt2 =
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        assert_eq!(detect_pre(&gpt2), Some("gpt-2"));
        let smol = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, {"type": "ByteLevel", "use_regex": true}]});
        assert_eq!(detect_pre(&smol), Some("smollm"));
        let l3 = serde_json::json!({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex":
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}},
            {"type": "ByteLevel", "use_regex": false}]});
        assert_eq!(detect_pre(&l3), Some("llama-bpe"));
    }
}

//! Prompt rendering for training: records → text with prompt/response spans → token ids
//! with a label mask.
//!
//! A [`Renderer`] is one of:
//! - the Stanford Alpaca prompt ([`Renderer::alpaca`]),
//! - ChatML or Llama 3 headers ([`Renderer::chatml`], [`Renderer::llama3`]), built-in
//!   Jinja templates,
//! - the model's own `chat_template` from `tokenizer_config.json` (or
//!   `chat_template.jinja`), rendered with minijinja configured as transformers'
//!   `apply_chat_template` configures jinja2: `trim_blocks`, `lstrip_blocks`, loop
//!   controls, `raise_exception`, a `tojson` that does not HTML-escape and formats like
//!   Python's `json.dumps`, `strftime_now`, Python string/dict methods, the special
//!   tokens (`bos_token`, `eos_token`, ...) and `add_generation_prompt`.
//!
//! Spans come from the renderer itself, not from template keywords: for every assistant
//! turn `i`, the text of `messages[..i]` with the generation prompt is the part before the
//! response, and the text of `messages[..=i]` ends after it; a template that does not
//! render prefixes consistently falls back to locating the content. The response span
//! ends after the turn's stop token (`<|im_end|>`, `<|eot_id|>`, the EOS, ...), and
//! whitespace the template prints after it stays masked. When the template does not close
//! the last response with a stop token, the tokenizer's EOS is appended and the sample is
//! flagged, so that the model learns to stop.

use std::path::Path;

use lora_spec::contracts::dataset::{RenderCheck, TemplateChoice};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind, Value};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{DatasetError, Result};
use crate::records::content_text;
use crate::tokens::LoadedTokenizer;
use crate::value::Val;

/// The label of a masked token (PyTorch's cross-entropy `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or another role the template knows).
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A turn.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A training sample in a layout-independent form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    /// A conversation; the assistant turns are trained.
    Chat(Vec<Message>),
    /// An instruction with optional input and system prompt; the output is trained.
    Instruction {
        /// Optional system prompt.
        system: Option<String>,
        /// The instruction.
        instruction: String,
        /// Extra context (may be empty).
        input: String,
        /// The target.
        output: String,
    },
    /// A prompt and its completion; the completion is trained.
    PromptCompletion {
        /// The prompt.
        prompt: String,
        /// The target.
        completion: String,
    },
    /// Plain text; all of it is trained.
    Text(String),
}

fn req_str(v: &Val<'_>, key: &str) -> Result<String> {
    match v.get(key) {
        Some(Val::Str(s)) => Ok(s.to_string()),
        Some(Val::Null) | None => Err(DatasetError::sample(
            format!("the field {key:?} is missing"),
            "every row needs its target field; profile the dataset to find such rows",
        )),
        Some(other) => Ok(content_text(other).unwrap_or_else(|| other.to_json().to_string())),
    }
}

fn opt_str(v: &Val<'_>, key: &str) -> String {
    match v.get(key) {
        Some(Val::Str(s)) => s.to_string(),
        Some(Val::Null) | None => String::new(),
        Some(other) => content_text(other).unwrap_or_else(|| other.to_json().to_string()),
    }
}

fn turns(list: &[Val<'_>], role_key: &str, content_key: &str) -> Result<Vec<Message>> {
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let role = t.get(role_key).and_then(Val::as_str).ok_or_else(|| {
            DatasetError::sample(
                format!("turn {i} has no {role_key:?}"),
                "each turn needs a role and a content",
            )
        })?;
        let role = match role {
            "human" | "user" => "user",
            "gpt" | "assistant" | "model" | "chatgpt" | "bing" => "assistant",
            "system" => "system",
            other => other,
        };
        let content = t
            .get(content_key)
            .and_then(content_text)
            .unwrap_or_default();
        out.push(Message::new(role, content));
    }
    Ok(out)
}

impl Sample {
    /// Reads a record in any known layout (alpaca, messages, sharegpt, prompt/completion,
    /// question/sql, text).
    pub fn from_record(v: &Val<'_>) -> Result<Sample> {
        if let Some(m) = v.get("messages").and_then(Val::as_list) {
            return Ok(Sample::Chat(turns(m, "role", "content")?));
        }
        if let Some(c) = v.get("conversations").and_then(Val::as_list) {
            let (rk, ck) = match c.first() {
                Some(t) if t.get("role").is_some() => ("role", "content"),
                _ => ("from", "value"),
            };
            return Ok(Sample::Chat(turns(c, rk, ck)?));
        }
        if v.get("instruction").is_some() {
            let output = if v.get("response").is_some() && v.get("output").is_none() {
                req_str(v, "response")?
            } else {
                req_str(v, "output")?
            };
            let system = v.get("system").and_then(Val::as_str).map(String::from);
            return Ok(Sample::Instruction {
                system,
                instruction: req_str(v, "instruction")?,
                input: opt_str(v, "input"),
                output,
            });
        }
        for q in ["question", "nlq", "natural_language", "utterance"] {
            if v.get(q).is_some() {
                for t in ["sql", "query", "sql_query", "SQL", "answer"] {
                    if v.get(t).is_some() {
                        let mut input = opt_str(v, "context");
                        if input.is_empty() {
                            input = opt_str(v, "schema");
                        }
                        return Ok(Sample::Instruction {
                            system: None,
                            instruction: req_str(v, q)?,
                            input,
                            output: req_str(v, t)?,
                        });
                    }
                }
            }
        }
        if v.get("prompt").is_some() {
            if let (Some(p), Some(c)) = (
                v.get("prompt").and_then(Val::as_list),
                v.get("completion").and_then(Val::as_list),
            ) {
                let mut m = turns(p, "role", "content")?;
                m.extend(turns(c, "role", "content")?);
                return Ok(Sample::Chat(m));
            }
            return Ok(Sample::PromptCompletion {
                prompt: req_str(v, "prompt")?,
                completion: req_str(v, "completion")?,
            });
        }
        if v.get("text").is_some() {
            return Ok(Sample::Text(req_str(v, "text")?));
        }
        Err(DatasetError::sample(
            "the record has no known layout",
            "use instruction/input/output, messages, conversations, prompt/completion, question/sql or text",
        ))
    }

    /// Reads a record from JSON.
    pub fn from_json(v: &serde_json::Value) -> Result<Sample> {
        Sample::from_record(&Val::from_json(v))
    }

    /// The sample as chat turns (instruction + input become the user turn).
    pub fn to_messages(&self) -> Vec<Message> {
        match self {
            Sample::Chat(m) => m.clone(),
            Sample::Instruction {
                system,
                instruction,
                input,
                output,
            } => {
                let mut m = Vec::new();
                if let Some(s) = system {
                    m.push(Message::new("system", s.clone()));
                }
                let user = if input.trim().is_empty() {
                    instruction.clone()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                m.push(Message::new("user", user));
                m.push(Message::new("assistant", output.clone()));
                m
            }
            Sample::PromptCompletion { prompt, completion } => vec![
                Message::new("user", prompt.clone()),
                Message::new("assistant", completion.clone()),
            ],
            Sample::Text(t) => vec![Message::new("assistant", t.clone())],
        }
    }
}

/// Special tokens a template may print.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SpecialTokens {
    /// Beginning of sequence (`bos_token`).
    pub bos: Option<String>,
    /// End of sequence (`eos_token`); appended when a response does not end in a stop token.
    pub eos: Option<String>,
    /// Padding (`pad_token`).
    pub pad: Option<String>,
    /// Unknown (`unk_token`).
    pub unk: Option<String>,
    /// Whether plain-text prompts (alpaca) should be tokenised with the tokenizer's own
    /// special tokens (its BOS), as `tokenizer(text)` does.
    pub add_special_tokens: bool,
}

fn token_str(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// Which kind of template a [`Renderer`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainOn {
    /// Every assistant turn is trained (TRL's `assistant_only_loss`, Axolotl's `roles_to_train: [assistant]`).
    AllAssistantTurns,
    /// Only the last assistant turn is trained.
    LastAssistantTurn,
}

/// Turn-end markers that also count as stop tokens when the template prints them.
const KNOWN_STOPS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<|eom_id|>",
    "<｜end▁of▁sentence｜>",
];

/// The Stanford Alpaca prompt with an input.
pub const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// The Stanford Alpaca prompt without an input.
pub const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// ChatML as a Jinja chat template (the form Hugging Face models ship).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
/// Llama 3 instruct headers as a Jinja chat template (Meta's template without tools).
pub const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

enum Kind {
    Alpaca,
    Jinja(Box<Environment<'static>>),
}

/// Renders samples into training text with spans.
pub struct Renderer {
    name: String,
    kind: Kind,
    special: SpecialTokens,
    stops: Vec<String>,
    source: Option<String>,
    /// Which assistant turns are trained.
    pub train_on: TrainOn,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer")
            .field("name", &self.name)
            .field("special", &self.special)
            .field("stops", &self.stops)
            .finish()
    }
}

/// A byte range of [`RenderedSample::text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// Start (inclusive).
    pub start: usize,
    /// End (exclusive).
    pub end: usize,
}

impl Span {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A rendered sample: the full text and which parts of it are trained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedSample {
    /// The text to tokenise.
    pub text: String,
    /// Everything before the first trained byte (system, user turns, headers).
    pub prompt_span: Span,
    /// The trained parts (one per trained assistant turn), each ending in its stop token.
    pub response_spans: Vec<Span>,
    /// Whether the renderer appended the EOS because the template did not close the response.
    pub eos_appended: bool,
    /// Whether tokenising should add the tokenizer's own special tokens (plain-text templates).
    pub add_special_tokens: bool,
}

/// Token ids and labels of a rendered sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedSample {
    /// Input ids.
    pub input_ids: Vec<u32>,
    /// Labels: the id where trained, [`IGNORE_INDEX`] where masked.
    pub labels: Vec<i64>,
    /// Trained tokens.
    pub trainable_tokens: usize,
    /// Whether the last trained token is a stop token.
    pub ends_with_unmasked_eos: bool,
}

impl RenderedSample {
    /// The last response span (the one that must end the sample).
    pub fn response_span(&self) -> Option<Span> {
        self.response_spans.last().copied()
    }

    /// Whether byte `pos` of the text is trained.
    pub fn is_trained(&self, pos: usize) -> bool {
        self.response_spans
            .iter()
            .any(|s| pos >= s.start && pos < s.end)
    }

    /// The text with trained parts in `[[` `]]`, for showing the mask to people.
    pub fn masked_view(&self) -> String {
        let mut out = String::with_capacity(self.text.len() + 8);
        let mut pos = 0;
        for s in &self.response_spans {
            out.push_str(&self.text[pos..s.start]);
            out.push_str("[[");
            out.push_str(&self.text[s.start..s.end]);
            out.push_str("]]");
            pos = s.end;
        }
        out.push_str(&self.text[pos..]);
        out
    }

    /// Tokenises the text and masks everything outside the response spans. A token is
    /// trained when it starts inside a span. `stop_ids` are the ids that may end a sample.
    pub fn tokenize(&self, tok: &Tokenizer, stop_ids: &[u32]) -> Result<TokenizedSample> {
        let enc = tok
            .encode(self.text.as_str(), self.add_special_tokens)
            .map_err(|e| {
                DatasetError::sample(format!("tokenizer failed: {e}"), "check the tokenizer")
            })?;
        let ids = enc.get_ids().to_vec();
        let mut labels = Vec::with_capacity(ids.len());
        let mut trainable = 0;
        for (id, (s, e)) in ids.iter().zip(enc.get_offsets()) {
            let trained = e > s && self.is_trained(*s);
            if trained {
                trainable += 1;
                labels.push(i64::from(*id));
            } else {
                labels.push(IGNORE_INDEX);
            }
        }
        let last_trained = labels.iter().rposition(|l| *l != IGNORE_INDEX);
        let ends = last_trained.is_some_and(|i| stop_ids.contains(&ids[i]));
        Ok(TokenizedSample {
            input_ids: ids,
            labels,
            trainable_tokens: trainable,
            ends_with_unmasked_eos: ends,
        })
    }
}

/// Python's `json.dumps` (ensure_ascii=False) formatting, for the `tojson` filter.
fn py_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let nl = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        J::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(out, depth + 1);
                py_json(x, indent, sort_keys, depth + 1, out);
            }
            nl(out, depth);
            out.push(']');
        }
        J::Object(o) => {
            if o.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            let mut entries: Vec<(&String, &serde_json::Value)> = o.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(out, depth + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                py_json(x, indent, sort_keys, depth + 1, out);
            }
            nl(out, depth);
            out.push('}');
        }
    }
}

fn tojson_filter(value: Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let j = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(JinjaErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    py_json(&j, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn raise_exception(msg: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(JinjaErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    // chrono's strftime covers Python's directives used by chat templates (%d %b %Y ...);
    // an unknown directive makes `write!` fail, and the format is then printed as is.
    if write!(out, "{}", chrono::Utc::now().format(&fmt)).is_err() {
        return fmt;
    }
    out
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` tags (which mark
/// assistant text for `return_assistant_tokens_mask`) into an always-true `if`, keeping
/// whitespace control; our spans do not depend on them.
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(end) = tail.find("%}") else {
            out.push_str(tail);
            return out;
        };
        let tag = &tail[..end + 2];
        let inner =
            tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let open = if tag.starts_with("{%-") { "{%-" } else { "{%" };
        let close = if tag.ends_with("-%}") { "-%}" } else { "%}" };
        match inner {
            "generation" => out.push_str(&format!("{open} if true {close}")),
            "endgeneration" => out.push_str(&format!("{open} endif {close}")),
            _ => out.push_str(tag),
        }
        rest = &tail[end + 2..];
    }
    out.push_str(rest);
    out
}

fn jinja_env(name: &str, source: &str) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| DatasetError::template(name, e.to_string(), "report a bug"))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned("chat", strip_generation_tags(source))
        .map_err(|e| {
            DatasetError::template(
                name,
                format!("the chat template does not compile: {e}"),
                "check the template's Jinja syntax, or use a built-in template (chatml, llama3, alpaca)",
            )
        })?;
    Ok(env)
}

impl Renderer {
    fn jinja_renderer(name: &str, source: &str, special: SpecialTokens) -> Result<Renderer> {
        let env = jinja_env(name, source)?;
        let mut stops: Vec<String> = KNOWN_STOPS
            .iter()
            .filter(|s| source.contains(**s))
            .map(|s| (*s).to_string())
            .collect();
        if let Some(e) = &special.eos
            && !stops.contains(e)
        {
            stops.push(e.clone());
        }
        Ok(Renderer {
            name: name.to_string(),
            kind: Kind::Jinja(Box::new(env)),
            special: SpecialTokens {
                add_special_tokens: false,
                ..special
            },
            stops,
            source: Some(source.to_string()),
            train_on: TrainOn::AllAssistantTurns,
        })
    }

    /// The Stanford Alpaca prompt; the response is followed by `special.eos`.
    pub fn alpaca(special: SpecialTokens) -> Renderer {
        let stops = special.eos.iter().cloned().collect();
        Renderer {
            name: "alpaca".into(),
            kind: Kind::Alpaca,
            special,
            stops,
            source: None,
            train_on: TrainOn::AllAssistantTurns,
        }
    }

    /// ChatML (`<|im_start|>` / `<|im_end|>`); `<|im_end|>` ends each turn.
    pub fn chatml(special: SpecialTokens) -> Result<Renderer> {
        let special = SpecialTokens {
            eos: special.eos.or_else(|| Some("<|im_end|>".into())),
            ..special
        };
        Self::jinja_renderer("chatml", CHATML_TEMPLATE, special)
    }

    /// Llama 3 instruct headers; `<|eot_id|>` ends each turn.
    pub fn llama3(special: SpecialTokens) -> Result<Renderer> {
        let special = SpecialTokens {
            bos: special.bos.or_else(|| Some("<|begin_of_text|>".into())),
            eos: special.eos.or_else(|| Some("<|eot_id|>".into())),
            ..special
        };
        Self::jinja_renderer("llama3", LLAMA3_TEMPLATE, special)
    }

    /// A Jinja chat template given as text.
    pub fn jinja(name: &str, source: &str, special: SpecialTokens) -> Result<Renderer> {
        Self::jinja_renderer(name, source, special)
    }

    /// Special tokens from a model folder's `tokenizer_config.json` (empty when absent).
    pub fn special_tokens_of(dir: &Path) -> Result<SpecialTokens> {
        let cfg = read_tokenizer_config(dir)?;
        Ok(match cfg {
            Some(c) => SpecialTokens {
                bos: token_str(c.get("bos_token")),
                eos: token_str(c.get("eos_token")),
                pad: token_str(c.get("pad_token")),
                unk: token_str(c.get("unk_token")),
                add_special_tokens: true,
            },
            None => SpecialTokens {
                add_special_tokens: true,
                ..SpecialTokens::default()
            },
        })
    }

    /// The model's own chat template: `chat_template` in `tokenizer_config.json` (a string,
    /// or the `default` entry of a list) or a `chat_template.jinja` file beside it.
    pub fn from_model_dir(dir: &Path) -> Result<Renderer> {
        let cfg = read_tokenizer_config(dir)?;
        let special = Self::special_tokens_of(dir)?;
        let mut source = None;
        if let Some(c) = &cfg {
            match c.get("chat_template") {
                Some(serde_json::Value::String(s)) => source = Some(s.clone()),
                Some(serde_json::Value::Array(list)) => {
                    source = list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .or_else(|| list.first())
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .map(String::from);
                }
                _ => {}
            }
        }
        if source.is_none() {
            let f = dir.join("chat_template.jinja");
            if f.is_file() {
                source = Some(std::fs::read_to_string(&f).map_err(|e| DatasetError::io(&f, e))?);
            }
        }
        let source = source.ok_or_else(|| {
            DatasetError::template(
                dir.display().to_string(),
                "the model has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja)",
                "base models often have none: use template alpaca, chatml or llama3",
            )
        })?;
        Self::jinja_renderer("tokenizer", &source, special)
    }

    /// A built-in or model template by choice; `model_dir` supplies special tokens (and the
    /// template for [`TemplateChoice::Tokenizer`]).
    pub fn for_choice(choice: TemplateChoice, model_dir: Option<&Path>) -> Result<Renderer> {
        let special = match model_dir {
            Some(d) => Self::special_tokens_of(d)?,
            None => SpecialTokens::default(),
        };
        match choice {
            TemplateChoice::Alpaca => Ok(Self::alpaca(SpecialTokens {
                eos: special.eos.clone().or_else(|| Some("</s>".into())),
                ..special
            })),
            TemplateChoice::Chatml => Self::chatml(SpecialTokens {
                eos: None,
                ..special
            }),
            TemplateChoice::Llama3 => Self::llama3(SpecialTokens {
                bos: None,
                eos: None,
                ..special
            }),
            TemplateChoice::Tokenizer => match model_dir {
                Some(d) => Self::from_model_dir(d),
                None => Err(DatasetError::template(
                    "tokenizer",
                    "the model's chat template needs tokenizer_name",
                    "set tokenizer_name to the model folder or hub id",
                )),
            },
        }
    }

    /// The template's name (`alpaca`, `chatml`, `llama3`, `tokenizer`, or the given name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Jinja source, for chat templates (store it, with its sha256, beside the adapter).
    pub fn template_source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The special tokens.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The strings that may end a trained response (EOS and turn-end markers).
    pub fn stop_tokens(&self) -> &[String] {
        &self.stops
    }

    /// Ids of [`Self::stop_tokens`] in `tok` (those it knows).
    pub fn stop_ids(&self, tok: &Tokenizer) -> Vec<u32> {
        self.stops
            .iter()
            .filter_map(|s| tok.token_to_id(s))
            .collect()
    }

    /// Renders chat turns exactly as transformers' `apply_chat_template(messages,
    /// tokenize=False, add_generation_prompt=...)` does (chat templates only).
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Kind::Jinja(env) = &self.kind else {
            return Err(DatasetError::template(
                &self.name,
                "the alpaca template has no chat form",
                "use render() for alpaca samples",
            ));
        };
        let tmpl = env
            .get_template("chat")
            .map_err(|e| DatasetError::template(&self.name, e.to_string(), "report a bug"))?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            tools => Value::from(()),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.special.bos.clone(),
            eos_token => self.special.eos.clone(),
            pad_token => self.special.pad.clone(),
            unk_token => self.special.unk.clone(),
        };
        tmpl.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            if let Some(d) = e.detail() {
                msg = format!("{msg}: {d}");
            }
            DatasetError::template(
                &self.name,
                format!("rendering failed: {msg}"),
                "the template rejected the conversation (roles must usually alternate user/assistant, system first)",
            )
        })
    }

    /// The prompt for generation (evaluation): everything before the response, with the
    /// generation prompt for chat templates.
    pub fn render_prompt(&self, sample: &Sample) -> Result<String> {
        match &self.kind {
            Kind::Alpaca => {
                let r = self.render(sample)?;
                Ok(r.text[..r.response_span().map_or(r.text.len(), |s| s.start)].to_string())
            }
            Kind::Jinja(_) => {
                let mut m = sample.to_messages();
                if m.last().is_some_and(|x| x.role == "assistant") {
                    m.pop();
                }
                self.apply_chat_template(&m, true)
            }
        }
    }

    fn ends_with_stop(&self, s: &str) -> bool {
        let t = s.trim_end();
        self.stops.iter().any(|x| t.ends_with(x.as_str()))
    }

    /// Ends a span after the stop token it contains (keeping whitespace after it masked),
    /// or after its last non-whitespace byte.
    fn tighten(&self, text: &str, span: Span) -> Span {
        let body = &text[span.start..span.end];
        let trimmed = body.trim_end();
        let mut end = span.start + trimmed.len();
        // The template may print the stop token after whitespace, e.g. content + "\n" + eos.
        for s in &self.stops {
            if let Some(i) = body.rfind(s.as_str()) {
                let e = span.start + i + s.len();
                if text[e..span.end].trim().is_empty() {
                    end = e;
                    break;
                }
            }
        }
        Span {
            start: span.start,
            end,
        }
    }

    /// Renders a sample with its spans (and the EOS appended when the template lacks one).
    pub fn render(&self, sample: &Sample) -> Result<RenderedSample> {
        let mut r = match (&self.kind, sample) {
            (Kind::Alpaca, _) => self.render_alpaca(sample)?,
            (Kind::Jinja(_), Sample::Text(t)) => RenderedSample {
                text: t.clone(),
                prompt_span: Span { start: 0, end: 0 },
                response_spans: vec![Span {
                    start: 0,
                    end: t.len(),
                }],
                eos_appended: false,
                add_special_tokens: true,
            },
            (Kind::Jinja(_), _) => self.render_chat(&sample.to_messages())?,
        };
        // Every sample must end in a trained stop token.
        if let Some(last) = r.response_spans.last().copied()
            && !self.ends_with_stop(&r.text[last.start..last.end])
        {
            let eos = self.special.eos.clone().ok_or_else(|| {
                DatasetError::template(
                    &self.name,
                    "the response does not end in a stop token and the tokenizer has no eos_token",
                    "set eos_token in tokenizer_config.json",
                )
            })?;
            r.text.insert_str(last.end, &eos);
            let n = r.response_spans.len();
            r.response_spans[n - 1].end += eos.len();
            r.eos_appended = true;
        }
        Ok(r)
    }

    fn render_alpaca(&self, sample: &Sample) -> Result<RenderedSample> {
        let (prompt, response) = match sample {
            Sample::Instruction {
                system,
                instruction,
                input,
                output,
            } => {
                let mut p = if input.trim().is_empty() {
                    ALPACA_NO_INPUT.replace("{instruction}", instruction)
                } else {
                    ALPACA_WITH_INPUT
                        .replacen("{instruction}", instruction, 1)
                        .replacen("{input}", input, 1)
                };
                if let Some(s) = system {
                    p = format!("{s}\n\n{p}");
                }
                (p, output.clone())
            }
            Sample::PromptCompletion { prompt, completion } => (prompt.clone(), completion.clone()),
            Sample::Text(t) => (String::new(), t.clone()),
            Sample::Chat(m) => {
                let users: Vec<&Message> = m.iter().filter(|x| x.role == "user").collect();
                let asst: Vec<&Message> = m.iter().filter(|x| x.role == "assistant").collect();
                if users.len() != 1 || asst.len() != 1 {
                    return Err(DatasetError::sample(
                        "the alpaca template takes one user turn and one assistant turn",
                        "use a chat template (chatml, llama3, tokenizer) for multi-turn data",
                    ));
                }
                (
                    ALPACA_NO_INPUT.replace("{instruction}", &users[0].content),
                    asst[0].content.clone(),
                )
            }
        };
        let eos = self.special.eos.clone().unwrap_or_default();
        let text = format!("{prompt}{response}{eos}");
        Ok(RenderedSample {
            prompt_span: Span {
                start: 0,
                end: prompt.len(),
            },
            response_spans: vec![Span {
                start: prompt.len(),
                end: text.len(),
            }],
            text,
            eos_appended: false,
            add_special_tokens: self.special.add_special_tokens,
        })
    }

    fn render_chat(&self, messages: &[Message]) -> Result<RenderedSample> {
        let full = self.apply_chat_template(messages, false)?;
        let assistant: Vec<usize> = messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == "assistant")
            .map(|(i, _)| i)
            .collect();
        if assistant.is_empty() {
            return Err(DatasetError::sample(
                "the conversation has no assistant turn to train on",
                "each conversation needs at least one assistant turn",
            ));
        }
        let trained: Vec<usize> = match self.train_on {
            TrainOn::AllAssistantTurns => assistant,
            TrainOn::LastAssistantTurn => assistant.last().copied().into_iter().collect(),
        };
        let mut spans = Vec::with_capacity(trained.len());
        let mut search_from = 0usize;
        for i in trained {
            let before = self.apply_chat_template(&messages[..i], true)?;
            let upto = self.apply_chat_template(&messages[..=i], false)?;
            let span = if full.starts_with(&upto)
                && upto.starts_with(&before)
                && before.len() >= search_from
            {
                Span {
                    start: before.len(),
                    end: upto.len(),
                }
            } else {
                // The template renders prefixes differently (e.g. it drops reasoning from
                // earlier turns): find the content itself.
                let content = messages[i].content.trim();
                let pos = full[search_from..].find(content).map(|p| p + search_from).ok_or_else(|| {
                    DatasetError::template(
                        &self.name,
                        format!("assistant turn {i} is not found in the rendered text (the template rewrites it)"),
                        "use a built-in template (chatml, llama3) for training",
                    )
                })?;
                let mut end = pos + content.len();
                let rest = &full[end..];
                let ws = rest.len() - rest.trim_start().len();
                if let Some(s) = self
                    .stops
                    .iter()
                    .find(|s| rest.trim_start().starts_with(s.as_str()))
                {
                    end += ws + s.len();
                }
                Span { start: pos, end }
            };
            let span = self.tighten(&full, span);
            search_from = span.end;
            spans.push(span);
        }
        let first = spans.first().map_or(full.len(), |s| s.start);
        Ok(RenderedSample {
            text: full,
            prompt_span: Span {
                start: 0,
                end: first,
            },
            response_spans: spans,
            eos_appended: false,
            add_special_tokens: false,
        })
    }
}

fn read_tokenizer_config(dir: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    let p = dir.join("tokenizer_config.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| DatasetError::io(&p, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        DatasetError::invalid(
            &p,
            Some(e.line() as u64),
            format!("bad JSON: {e}"),
            "re-save the tokenizer",
        )
    })?;
    match v {
        serde_json::Value::Object(o) => Ok(Some(o)),
        _ => Err(DatasetError::invalid(
            &p,
            None,
            "expected a JSON object",
            "re-save the tokenizer",
        )),
    }
}

/// Renders sampled rows with `choice`, tokenises them when a tokenizer is known, and
/// reports mask and end-of-sequence statistics.
pub fn check_sample_rows(
    choice: TemplateChoice,
    tokenizer: Option<&LoadedTokenizer>,
    rows: &[(String, Option<u64>, Val<'static>)],
    max_examples: usize,
) -> Result<RenderCheck> {
    let renderer = Renderer::for_choice(choice, tokenizer.map(|t| t.dir.as_path()))?;
    let stop_ids = tokenizer
        .map(|t| renderer.stop_ids(&t.tokenizer))
        .unwrap_or_default();
    let mut check = RenderCheck {
        template: renderer.name().to_string(),
        by_tokens: tokenizer.is_some(),
        ..RenderCheck::default()
    };
    let (mut trained, mut total) = (0u64, 0u64);
    let mut shown = false;
    for (file, line, v) in rows {
        let at = match line {
            Some(l) => format!("{file}:{l}"),
            None => file.clone(),
        };
        let rendered = Sample::from_record(v).and_then(|s| renderer.render(&s));
        let r = match rendered {
            Ok(r) => r,
            Err(e) => {
                check.render_errors += 1;
                if check.examples.len() < max_examples {
                    check.examples.push(format!("{at}: {e}"));
                }
                continue;
            }
        };
        check.rendered += 1;
        if r.eos_appended {
            check.eos_appended += 1;
        }
        let (ends, n_trained, n_total) = match tokenizer {
            Some(t) => {
                let ts = r.tokenize(&t.tokenizer, &stop_ids)?;
                (
                    ts.ends_with_unmasked_eos,
                    ts.trainable_tokens as u64,
                    ts.input_ids.len() as u64,
                )
            }
            None => {
                let n: usize = r.response_spans.iter().map(Span::len).sum();
                let last = r
                    .response_span()
                    .map(|s| &r.text[s.start..s.end])
                    .unwrap_or("");
                (renderer.ends_with_stop(last), n as u64, r.text.len() as u64)
            }
        };
        if ends {
            check.ends_with_unmasked_eos += 1;
        } else if check.examples.len() < max_examples {
            check
                .examples
                .push(format!("{at}: the last trained token is not a stop token"));
        }
        if n_trained == 0 {
            check.zero_trainable += 1;
            if check.examples.len() < max_examples {
                check.examples.push(format!("{at}: no trainable token"));
            }
        }
        trained += n_trained;
        total += n_total;
        if !shown && check.examples.len() < max_examples {
            let mut view = r.masked_view();
            if view.len() > 800 {
                let mut cut = 800;
                while !view.is_char_boundary(cut) {
                    cut -= 1;
                }
                view.truncate(cut);
                view.push_str(" …");
            }
            check
                .examples
                .push(format!("{at}: mask ([[trained]]): {view}"));
            shown = true;
        }
    }
    check.trained_token_fraction = if total == 0 {
        0.0
    } else {
        ((trained as f64 / total as f64) * 10_000.0).round() / 10_000.0
    };
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::test_support::write_word_tokenizer;

    fn special(bos: Option<&str>, eos: &str) -> SpecialTokens {
        SpecialTokens {
            bos: bos.map(String::from),
            eos: Some(eos.into()),
            ..SpecialTokens::default()
        }
    }

    fn conv() -> Vec<Message> {
        vec![
            Message::new("system", "Answer in SQL."),
            Message::new("user", "how many offices"),
            Message::new("assistant", "SELECT count(*) FROM offices"),
            Message::new("user", "and employees"),
            Message::new("assistant", "SELECT count(*) FROM employees"),
        ]
    }

    #[test]
    fn alpaca_spans_and_eos() {
        let r = Renderer::alpaca(special(None, "</s>"));
        let s = Sample::from_json(&serde_json::json!({"instruction": "list offices", "input": "", "output": "SELECT * FROM offices"})).unwrap();
        let out = r.render(&s).unwrap();
        assert!(
            out.text
                .starts_with("Below is an instruction that describes a task. Write")
        );
        assert!(
            out.text
                .ends_with("### Response:\nSELECT * FROM offices</s>")
        );
        let resp = out.response_span().unwrap();
        assert_eq!(&out.text[resp.start..resp.end], "SELECT * FROM offices</s>");
        assert_eq!(out.prompt_span.end, resp.start);
        assert!(!out.eos_appended);
        let s = Sample::from_json(
            &serde_json::json!({"instruction": "i", "input": "ctx", "output": "o"}),
        )
        .unwrap();
        assert!(
            r.render(&s)
                .unwrap()
                .text
                .contains("### Input:\nctx\n\n### Response:\no</s>")
        );
        let prompt = r.render_prompt(&s).unwrap();
        assert!(prompt.ends_with("### Response:\n"));
    }

    #[test]
    fn chatml_multi_turn_spans_mask_and_tokens() {
        let r = Renderer::chatml(SpecialTokens::default()).unwrap();
        let out = r.render(&Sample::Chat(conv())).unwrap();
        assert_eq!(out.response_spans.len(), 2);
        for (span, want) in out.response_spans.iter().zip([
            "SELECT count(*) FROM offices<|im_end|>",
            "SELECT count(*) FROM employees<|im_end|>",
        ]) {
            assert_eq!(&out.text[span.start..span.end], want);
        }
        assert!(
            out.text.ends_with("<|im_end|>\n"),
            "the template's newline stays (masked)"
        );
        assert!(
            out.masked_view()
                .contains("<|im_start|>assistant\n[[SELECT count(*) FROM offices<|im_end|>]]\n")
        );
        assert_eq!(
            &out.text[..out.prompt_span.end],
            "<|im_start|>system\nAnswer in SQL.<|im_end|>\n<|im_start|>user\nhow many offices<|im_end|>\n<|im_start|>assistant\n"
        );

        // Token level: the word tokenizer knows the special tokens.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokenizer.json");
        write_word_tokenizer(
            &f,
            &[
                "SELECT",
                "count(*)",
                "FROM",
                "offices",
                "employees",
                "user",
                "assistant",
                "system",
            ],
            &["<|im_start|>", "<|im_end|>"],
        );
        let tok = Tokenizer::from_file(&f).unwrap();
        let ids = r.stop_ids(&tok);
        assert_eq!(ids, vec![tok.token_to_id("<|im_end|>").unwrap()]);
        let t = out.tokenize(&tok, &ids).unwrap();
        assert!(t.ends_with_unmasked_eos);
        // "SELECT count(*) FROM offices <|im_end|>" twice = 2 * 5 trained tokens.
        assert_eq!(t.trainable_tokens, 10);
        let trained: Vec<u32> = t
            .labels
            .iter()
            .filter(|l| **l != IGNORE_INDEX)
            .map(|l| *l as u32)
            .collect();
        assert_eq!(
            tok.decode(&trained[..5], false).unwrap(),
            "SELECT count(*) FROM offices <|im_end|>"
        );
        // Only the last turn.
        let mut r = r;
        r.train_on = TrainOn::LastAssistantTurn;
        assert_eq!(
            r.render(&Sample::Chat(conv()))
                .unwrap()
                .response_spans
                .len(),
            1
        );
    }

    #[test]
    fn llama3_builtin_and_missing_eos_is_appended() {
        let r = Renderer::llama3(SpecialTokens::default()).unwrap();
        let out = r.render(&Sample::Chat(conv()[1..3].to_vec())).unwrap();
        assert!(out.text.starts_with("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhow many offices<|eot_id|>"));
        let s = out.response_span().unwrap();
        assert_eq!(
            &out.text[s.start..s.end],
            "SELECT count(*) FROM offices<|eot_id|>"
        );
        assert!(!out.eos_appended);

        // A template that never prints an end-of-turn token: the EOS is appended and flagged.
        let bare = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";
        let r = Renderer::jinja("bare", bare, special(None, "</s>")).unwrap();
        let out = r.render(&Sample::Chat(conv()[1..3].to_vec())).unwrap();
        assert!(out.eos_appended);
        assert_eq!(
            out.text,
            "user: how many offices\nassistant: SELECT count(*) FROM offices</s>\n"
        );
        let s = out.response_span().unwrap();
        assert_eq!(
            &out.text[s.start..s.end],
            "SELECT count(*) FROM offices</s>"
        );
    }

    #[test]
    fn template_errors_are_clear() {
        let e = Renderer::jinja("x", "{% for m in messages %}", special(None, "</s>")).unwrap_err();
        assert!(e.to_string().contains("does not compile"), "{e}");
        let strict = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('roles must be user/assistant') }}{% endif %}{{ m.content }}{% endfor %}";
        let r = Renderer::jinja("strict", strict, special(None, "</s>")).unwrap();
        let e = r.render(&Sample::Chat(conv())).unwrap_err();
        assert!(
            e.to_string().contains("roles must be user/assistant"),
            "{e}"
        );
        let e = r
            .render(&Sample::Chat(vec![Message::new("user", "hi")]))
            .unwrap_err();
        assert!(e.to_string().contains("no assistant turn"), "{e}");
        assert!(Sample::from_json(&serde_json::json!({"foo": 1})).is_err());
    }

    #[test]
    fn generation_tags_are_rewritten() {
        let src = "{%- for m in messages -%}{%- if m.role == 'assistant' -%}{% generation %}{{ m.content }}{% endgeneration %}{%- else -%}{{ m.content }}{%- endif -%}{%- endfor -%}";
        let r = Renderer::jinja("gen", src, special(None, "</s>")).unwrap();
        let out = r.apply_chat_template(&conv()[1..3], false).unwrap();
        assert_eq!(out, "how many officesSELECT count(*) FROM offices");
    }

    /// SmolLM2's ChatML template (with its default system turn) and a Llama-3.1-style
    /// template that uses namespace, tojson(indent), strip(), loop controls, is-tests,
    /// raise_exception and whitespace control, rendered by transformers' apply_chat_template
    /// and by us: the strings must be identical.
    #[test]
    fn chat_templates_match_transformers_apply_chat_template() {
        let smol = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let fancy = r#"{{- bos_token }}
{%- set ns = namespace(system='', n=0) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- set meta = {"date": "26 Jul 2024", "tools": none, "n": messages | length} %}
{{- "Meta: " + meta | tojson(indent=4) + "\n" }}
{{- "Compact: " + {"a": [1, 2.5, "x"], "b": {"c": true}} | tojson + "\n" }}
{{- ns.system + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
    {%- if message.content is string and message.content.strip() == '' %}
        {%- continue %}
    {%- endif %}
    {%- set ns.n = ns.n + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'].strip() + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;
        let dir = tempfile::tempdir().unwrap();
        let convs = vec![
            conv(),
            conv()[1..3].to_vec(),
            vec![
                Message::new("user", "  spaced  "),
                Message::new("assistant", "ünïcode \"quoted\" <tag> & done"),
                Message::new("user", "   "),
                Message::new("assistant", "ok"),
            ],
        ];
        for (name, src, bos, eos) in [
            ("smollm2", smol, "<|im_start|>", "<|im_end|>"),
            ("fancy", fancy, "<|begin_of_text|>", "<|eot_id|>"),
        ] {
            let model = dir.path().join(name);
            std::fs::create_dir_all(&model).unwrap();
            write_word_tokenizer(&model.join("tokenizer.json"), &["a"], &[bos, eos]);
            let cfg = serde_json::json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": {"content": eos, "__type": "AddedToken"},
                "chat_template": src,
            });
            std::fs::write(
                model.join("tokenizer_config.json"),
                serde_json::to_vec(&cfg).unwrap(),
            )
            .unwrap();
            let convs_json = serde_json::to_string(&convs).unwrap();
            let script = "import sys, json\nfrom transformers import AutoTokenizer\n\
                tok = AutoTokenizer.from_pretrained(sys.argv[1])\n\
                convs = json.loads(sys.argv[2])\n\
                out = [[tok.apply_chat_template(c, tokenize=False, add_generation_prompt=g) for g in (False, True)] for c in convs]\n\
                print(json.dumps(out))\n";
            let got = crate::tests::run_python(script, &[model.to_str().unwrap(), &convs_json]);
            let want: Vec<Vec<String>> = serde_json::from_str(got.trim()).unwrap();
            let r = Renderer::from_model_dir(&model).unwrap();
            for (c, w) in convs.iter().zip(&want) {
                // The fancy template drops the system turn and skips blank turns; both must agree.
                assert_eq!(
                    r.apply_chat_template(c, false).unwrap(),
                    w[0],
                    "{name}, no generation prompt"
                );
                assert_eq!(
                    r.apply_chat_template(c, true).unwrap(),
                    w[1],
                    "{name}, generation prompt"
                );
            }
            // Training spans from the model template end in its stop token.
            let out = r.render(&Sample::Chat(convs[1].clone())).unwrap();
            let s = out.response_span().unwrap();
            assert!(
                out.text[s.start..s.end].ends_with(eos),
                "{name}: {}",
                out.masked_view()
            );
            assert!(!out.eos_appended);
        }
        // raise_exception surfaces as an error in both.
        let bad = vec![Message::new("tool", "x"), Message::new("assistant", "y")];
        let r = Renderer::from_model_dir(&dir.path().join("fancy")).unwrap();
        assert!(
            r.apply_chat_template(&bad, false)
                .unwrap_err()
                .to_string()
                .contains("Only user and assistant")
        );
    }
}

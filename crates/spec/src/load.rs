//! Loading YAML or JSON documents into typed values with errors that name the
//! field, the file and the line, and say what would fix them.
//!
//! The pipeline, for any document type `T` (spec, config file, skill input):
//! 1. parse the text into a `serde_json::Value` and a [`LineIndex`] (field
//!    path → line) — YAML through `yaml-rust2`'s marked events, JSON through
//!    `serde_json` (its errors carry line and column);
//! 2. walk the value against `T`'s JSON schema: unknown keys are errors with a
//!    "did you mean" suggestion;
//! 3. deserialise with `serde_path_to_error`, so a type error names its path;
//! 4. the caller's semantic checks return [`Issue`]s whose paths are mapped to
//!    lines by the same index.

use std::collections::HashMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::{Issue, SpecError};

/// Text syntax of a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// YAML 1.2 (a superset of JSON, except for some edge cases).
    Yaml,
    /// Strict JSON.
    Json,
}

impl Syntax {
    /// JSON for `.json` files, YAML for everything else.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Self::Json,
            _ => Self::Yaml,
        }
    }
}

/// Where each field path starts in the source text.
#[derive(Debug, Clone, Default)]
pub struct LineIndex {
    lines: HashMap<String, (u64, u64)>,
}

impl LineIndex {
    /// `(line, column)` of `path`, or of its nearest ancestor that has one.
    pub fn locate(&self, path: &str) -> Option<(u64, u64)> {
        let mut p = path.to_string();
        loop {
            if let Some(&lc) = self.lines.get(&p) {
                return Some(lc);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }

    /// Fills in the line and column of each issue from its path.
    pub fn annotate(&self, issues: &mut [Issue]) {
        for i in issues {
            if i.line.is_none()
                && let Some((l, c)) = self.locate(&i.path)
            {
                i.line = Some(l);
                i.column = Some(c);
            }
        }
    }
}

/// A parsed document: its value and where its fields are.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file name used in messages.
    pub file: String,
    /// The content.
    pub value: Value,
    /// Field path → line.
    pub index: LineIndex,
}

impl Document {
    /// Reads and parses a file (syntax by extension).
    pub fn read(path: &Path) -> Result<Self, SpecError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                "check the path; relative paths are taken from the current directory"
            } else {
                "check the file's permissions"
            };
            SpecError {
                file: file.clone(),
                issues: vec![Issue::new("", format!("cannot read the file: {e}")).hint(hint)],
            }
        })?;
        let text = String::from_utf8(bytes).map_err(|e| SpecError {
            file: file.clone(),
            issues: vec![
                Issue::new(
                    "",
                    format!(
                        "the file is not valid UTF-8 (bad byte at offset {})",
                        e.utf8_error().valid_up_to()
                    ),
                )
                .hint("save the file as UTF-8"),
            ],
        })?;
        Self::parse(&text, &file, Syntax::from_path(path))
    }

    /// Parses text.
    pub fn parse(text: &str, file: &str, syntax: Syntax) -> Result<Self, SpecError> {
        let err = |issue: Issue| SpecError {
            file: file.to_string(),
            issues: vec![issue],
        };
        if text.trim().is_empty() {
            return Err(err(Issue::new("", "the file is empty").hint(
                "an experiment needs at least `version`, `dataset.path` and `config.base_model`; see examples/quickstart.yaml",
            )));
        }
        let (value, index) = match syntax {
            Syntax::Json => {
                let value: Value = serde_json::from_str(text).map_err(|e| {
                    let mut i = Issue::new("", format!("invalid JSON: {}", strip_location(&e)))
                        .hint(json_hint(&e));
                    i.line = Some(e.line() as u64);
                    i.column = Some(e.column() as u64);
                    err(i)
                })?;
                // JSON is YAML too, so the YAML scanner finds the lines.
                let index = yaml_to_value(text).map(|(_, i)| i).unwrap_or_default();
                (value, index)
            }
            Syntax::Yaml => yaml_to_value(text).map_err(err)?,
        };
        Ok(Self {
            file: file.to_string(),
            value,
            index,
        })
    }

    /// Checks keys against `T`'s schema, then deserialises, then runs `check`.
    /// Every issue comes back with its line.
    pub fn decode<T: DeserializeOwned + JsonSchema>(
        &self,
        check: impl FnOnce(&T) -> Vec<Issue>,
    ) -> Result<T, SpecError> {
        let mut issues = unknown_keys::<T>(&self.value);
        if issues.is_empty() {
            match decode_value::<T>(self.value.clone()) {
                Ok(v) => {
                    issues = check(&v);
                    if issues.is_empty() {
                        return Ok(v);
                    }
                }
                Err(i) => issues.push(i),
            }
        }
        self.index.annotate(&mut issues);
        issues.sort_by_key(|i| i.line.unwrap_or(u64::MAX));
        Err(SpecError {
            file: self.file.clone(),
            issues,
        })
    }
}

fn strip_location(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn json_hint(e: &serde_json::Error) -> String {
    let s = e.to_string();
    if s.contains("trailing comma") {
        "remove the comma after the last item".into()
    } else if s.contains("EOF") {
        "the document ends early: close every { and [".into()
    } else if s.contains("key must be a string") {
        "JSON keys need double quotes".into()
    } else {
        "check the JSON syntax near that position".into()
    }
}

/// Deserialises `value` into `T`; a failure names the field path.
pub fn decode_value<T: DeserializeOwned>(value: Value) -> Result<T, Issue> {
    let original = value.clone();
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let msg = e.into_inner().to_string();
        friendly_type_error(&path, &msg, lookup(&original, &path))
    })
}

/// Finds the value at a dotted path (`a.b[2].c`).
pub fn lookup<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = root;
    if path.is_empty() {
        return Some(cur);
    }
    for part in split_path(path) {
        cur = match part {
            PathPart::Key(k) => cur.get(k)?,
            PathPart::Index(i) => cur.get(i)?,
        };
    }
    Some(cur)
}

enum PathPart<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<PathPart<'_>> {
    let mut out = Vec::new();
    for seg in path.split('.') {
        let (key, rest) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !key.is_empty() {
            out.push(PathPart::Key(key));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(n) = idx.trim_end_matches(']').parse() {
                out.push(PathPart::Index(n));
            }
        }
    }
    out
}

fn friendly_type_error(path: &str, msg: &str, got: Option<&Value>) -> Issue {
    let got_s = got.map(short_json);
    // Unknown enum variant: suggest the nearest one.
    if let Some(rest) = msg.strip_prefix("unknown variant `") {
        let bad = rest.split('`').next().unwrap_or("");
        let expected = backticked(msg).into_iter().skip(1).collect::<Vec<_>>();
        let mut hint = format!("one of: {}", expected.join(", "));
        if let Some(s) = suggest(bad, expected.iter().map(String::as_str)) {
            hint = format!("did you mean `{s}`? ({hint})");
        }
        return Issue::new(path, format!("unknown value `{bad}`")).hint(hint);
    }
    if msg.starts_with("missing field `") {
        let field = backticked(msg).into_iter().next().unwrap_or_default();
        let full = if path.is_empty() {
            field.clone()
        } else {
            format!("{path}.{field}")
        };
        return Issue::new(full, "is required but missing").hint(format!("add `{field}: ...`"));
    }
    if let Some(Value::Number(n)) = got
        && n.as_i64().is_some_and(|v| v < 0)
        && (msg.contains("expected u") || msg.contains("expected usize"))
    {
        return Issue::new(
            path,
            format!("must be a non-negative whole number (got {n})"),
        )
        .hint("use a value of 1 or more");
    }
    if msg.starts_with("invalid type") {
        let expected = msg.split("expected ").nth(1).unwrap_or("another type");
        return Issue::new(
            path,
            format!(
                "has the wrong type: expected {expected}, got {}",
                got_s.unwrap_or_else(|| "something else".into())
            ),
        )
        .hint("quote strings only where text is meant; write numbers bare (2e-4)");
    }
    Issue::new(path, msg.to_string())
}

fn short_json(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}...", &s[..s.floor_char_boundary(37)])
    } else {
        s
    }
}

fn backticked(msg: &str) -> Vec<String> {
    msg.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect()
}

/// The closest candidate to `bad`, if it is close enough to be a typo.
pub fn suggest<'a>(bad: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let bad_l = bad.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(&bad_l, &c.to_ascii_lowercase()), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

/// Keys of `value` that `T`'s schema does not know, with suggestions.
pub fn unknown_keys<T: JsonSchema>(value: &Value) -> Vec<Issue> {
    let schema = serde_json::to_value(lora_skill::schema_of::<T>()).unwrap_or(Value::Null);
    let mut out = Vec::new();
    walk_unknown(value, &schema, "", &mut out);
    out
}

fn object_properties(schema: &Value) -> Option<(&Map<String, Value>, bool)> {
    let props = schema.get("properties")?.as_object()?;
    // A struct schema is closed unless it explicitly allows more properties.
    let open = matches!(
        schema.get("additionalProperties"),
        Some(Value::Object(_)) | Some(Value::Bool(true))
    );
    Some((props, open))
}

fn branches(schema: &Value) -> Vec<&Value> {
    let mut out = vec![schema];
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(items)) = schema.get(key) {
            for s in items {
                out.extend(branches(s));
            }
        }
    }
    out
}

fn walk_unknown(value: &Value, schema: &Value, path: &str, out: &mut Vec<Issue>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match value {
        Value::Object(map) => {
            let all = branches(schema);
            // Merge the properties of every branch that describes an object.
            let mut props: Map<String, Value> = Map::new();
            let mut closed = false;
            let mut additional: Option<&Value> = None;
            for b in &all {
                if let Some((p, open)) = object_properties(b) {
                    closed |= !open;
                    for (k, v) in p {
                        props.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
                if let Some(a @ Value::Object(_)) = b.get("additionalProperties") {
                    additional = Some(a);
                }
            }
            for (k, v) in map {
                if let Some(s) = props.get(k) {
                    walk_unknown(v, s, &join(k), out);
                } else if closed && !props.is_empty() {
                    let mut issue = Issue::new(join(k), format!("unknown key `{k}`"));
                    issue = match suggest(k, props.keys().map(String::as_str)) {
                        Some(s) => issue.hint(format!("did you mean `{s}`?")),
                        None => issue.hint(format!(
                            "known keys here: {}",
                            props.keys().cloned().collect::<Vec<_>>().join(", ")
                        )),
                    };
                    out.push(issue);
                } else if let Some(a) = additional {
                    walk_unknown(v, a, &join(k), out);
                }
            }
        }
        Value::Array(items) => {
            for b in branches(schema) {
                if let Some(item_schema) = b.get("items") {
                    for (i, v) in items.iter().enumerate() {
                        walk_unknown(v, item_schema, &format!("{path}[{i}]"), out);
                    }
                    return;
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// YAML → JSON value, with a line index.

enum Frame {
    Map {
        obj: Map<String, Value>,
        key: Option<String>,
        anchor: usize,
        path: String,
    },
    Seq {
        arr: Vec<Value>,
        anchor: usize,
        path: String,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Value>,
    root: Option<Value>,
    documents: usize,
    index: LineIndex,
    error: Option<Issue>,
}

impl Builder {
    fn child_path(&self) -> String {
        match self.stack.last() {
            None => String::new(),
            Some(Frame::Map { key, path, .. }) => {
                let k = key.clone().unwrap_or_default();
                if path.is_empty() {
                    k
                } else {
                    format!("{path}.{k}")
                }
            }
            Some(Frame::Seq { arr, path, .. }) => format!("{path}[{}]", arr.len()),
        }
    }

    fn fail(&mut self, mark: Marker, msg: &str, hint: &str) {
        if self.error.is_none() {
            let mut i = Issue::new(self.child_path(), msg).hint(hint);
            i.line = Some(mark.line() as u64);
            i.column = Some(mark.col() as u64 + 1);
            self.error = Some(i);
        }
    }

    /// Places a finished value into its parent (or as the root).
    fn push_value(&mut self, v: Value, anchor: usize, mark: Marker) {
        if anchor > 0 {
            self.anchors.insert(anchor, v.clone());
        }
        match self.stack.last_mut() {
            None => {
                self.documents += 1;
                if self.root.is_none() {
                    self.root = Some(v);
                }
            }
            Some(Frame::Seq { arr, .. }) => arr.push(v),
            Some(Frame::Map { obj, key, .. }) => match key.take() {
                Some(k) if k == "<<" => {
                    // YAML merge key: copy entries not already set.
                    let items = match v {
                        Value::Array(a) => a,
                        other => vec![other],
                    };
                    for item in items {
                        if let Value::Object(m) = item {
                            for (mk, mv) in m {
                                obj.entry(mk).or_insert(mv);
                            }
                        }
                    }
                }
                Some(k) => {
                    if obj.contains_key(&k) {
                        let msg = format!("duplicate key `{k}`");
                        self.fail(mark, &msg, "each key may appear once per mapping");
                        return;
                    }
                    obj.insert(k, v);
                }
                None => match v {
                    Value::String(s) => *key = Some(s),
                    Value::Number(n) => *key = Some(n.to_string()),
                    Value::Bool(b) => *key = Some(b.to_string()),
                    Value::Null => *key = Some("null".into()),
                    _ => self.fail(
                        mark,
                        "complex mapping keys are not supported",
                        "use plain text keys",
                    ),
                },
            },
        }
    }

    fn note_line(&mut self, mark: Marker) {
        // Record where the current key or sequence item starts.
        let p = self.child_path();
        if !p.is_empty() {
            self.index
                .lines
                .entry(p)
                .or_insert((mark.line() as u64, mark.col() as u64 + 1));
        }
    }

    fn awaiting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None, .. }))
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let v = resolve_scalar(&text, style, tag.as_ref().map(|t| t.suffix.as_str()));
                if self.awaiting_key() {
                    // Record the key's own line for the path it opens.
                    let key = match &v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    if let Some(Frame::Map { path, .. }) = self.stack.last() {
                        let p = if path.is_empty() {
                            key
                        } else {
                            format!("{path}.{key}")
                        };
                        self.index
                            .lines
                            .entry(p)
                            .or_insert((mark.line() as u64, mark.col() as u64 + 1));
                    }
                } else {
                    self.note_line(mark);
                }
                self.push_value(v, anchor, mark);
            }
            Event::MappingStart(anchor, _) => {
                self.note_line(mark);
                let path = self.child_path();
                self.stack.push(Frame::Map {
                    obj: Map::new(),
                    key: None,
                    anchor,
                    path,
                });
            }
            Event::SequenceStart(anchor, _) => {
                self.note_line(mark);
                let path = self.child_path();
                self.stack.push(Frame::Seq {
                    arr: Vec::new(),
                    anchor,
                    path,
                });
            }
            Event::MappingEnd => {
                if let Some(Frame::Map { obj, anchor, .. }) = self.stack.pop() {
                    self.push_value(Value::Object(obj), anchor, mark);
                }
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq { arr, anchor, .. }) = self.stack.pop() {
                    self.push_value(Value::Array(arr), anchor, mark);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(v) => {
                    self.note_line(mark);
                    self.push_value(v, 0, mark);
                }
                None => self.fail(
                    mark,
                    "alias to an unknown anchor",
                    "define the anchor (&name) before using it (*name)",
                ),
            },
            _ => {}
        }
    }
}

fn yaml_to_value(text: &str) -> Result<(Value, LineIndex), Issue> {
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut b, true) {
        let mut i = Issue::new("", format!("invalid YAML: {}", e.info())).hint(
            "check indentation (spaces, not tabs), colons after keys and closing quotes or brackets",
        );
        i.line = Some(e.marker().line() as u64);
        i.column = Some(e.marker().col() as u64 + 1);
        return Err(i);
    }
    if let Some(e) = b.error {
        return Err(e);
    }
    if b.documents > 1 {
        return Err(Issue::new("", "the file holds more than one YAML document")
            .hint("keep one experiment per file (remove the extra `---`)"));
    }
    match b.root {
        Some(Value::Null) | None => Err(Issue::new("", "the file is empty").hint(
            "an experiment needs at least `version`, `dataset.path` and `config.base_model`",
        )),
        Some(v) => Ok((v, b.index)),
    }
}

/// YAML 1.2 core-schema resolution of a scalar (so `2e-4` is the number 0.0002).
fn resolve_scalar(text: &str, style: TScalarStyle, tag: Option<&str>) -> Value {
    if style != TScalarStyle::Plain || tag == Some("str") {
        return Value::String(text.to_string());
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let t = text.replace('_', "");
    let looks_numeric = t
        .trim_start_matches(['+', '-'])
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '.');
    if looks_numeric {
        if let Some(hex) = t.strip_prefix("0x")
            && let Ok(n) = i64::from_str_radix(hex, 16)
        {
            return Value::Number(n.into());
        }
        if let Some(oct) = t.strip_prefix("0o")
            && let Ok(n) = i64::from_str_radix(oct, 8)
        {
            return Value::Number(n.into());
        }
        if let Ok(n) = t.parse::<i64>() {
            return Value::Number(n.into());
        }
        if let Ok(n) = t.parse::<u64>() {
            return Value::Number(n.into());
        }
        if t.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c))
            && let Ok(f) = t.parse::<f64>()
            && let Some(n) = Number::from_f64(f)
        {
            return Value::Number(n);
        }
    }
    Value::String(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemars::JsonSchema;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, JsonSchema, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        lora_rank: u32,
        #[serde(default)]
        learning_rate: f64,
    }

    #[derive(Debug, Deserialize, JsonSchema, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        name: String,
        config: Inner,
        #[serde(default)]
        tags: Vec<String>,
    }

    fn parse(text: &str) -> Result<Doc, SpecError> {
        Document::parse(text, "t.yaml", Syntax::Yaml)?.decode::<Doc>(|_| vec![])
    }

    #[test]
    fn scientific_notation_is_a_number() {
        let d = parse("name: x\nconfig:\n  lora_rank: 4\n  learning_rate: 2e-4\n").unwrap();
        assert_eq!(d.config.learning_rate, 0.0002);
        assert_eq!(
            resolve_scalar("1_000", TScalarStyle::Plain, None),
            Value::from(1000)
        );
        assert_eq!(
            resolve_scalar("2e-4", TScalarStyle::DoubleQuoted, None),
            Value::from("2e-4")
        );
        assert_eq!(
            resolve_scalar("1.5.2", TScalarStyle::Plain, None),
            Value::from("1.5.2")
        );
        assert_eq!(
            resolve_scalar("yes", TScalarStyle::Plain, None),
            Value::from("yes")
        );
    }

    #[test]
    fn typo_gets_a_suggestion_and_a_line() {
        let e = parse("name: x\nconfig:\n  lora_rnk: 4\n").unwrap_err();
        let i = &e.issues[0];
        assert_eq!(i.path, "config.lora_rnk");
        assert_eq!(i.line, Some(3));
        assert!(i.hint.as_deref().unwrap().contains("lora_rank"), "{i:?}");
    }

    #[test]
    fn wrong_type_names_path_and_line() {
        let e = parse("name: x\nconfig:\n  lora_rank: sixteen\n").unwrap_err();
        let i = &e.issues[0];
        assert_eq!(i.path, "config.lora_rank");
        assert_eq!(i.line, Some(3));
        assert!(i.message.contains("wrong type"), "{i:?}");
    }

    #[test]
    fn negative_unsigned_is_explained() {
        let e = parse("name: x\nconfig:\n  lora_rank: -4\n").unwrap_err();
        assert!(e.issues[0].message.contains("non-negative"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = parse("name: x\nconfig: {}\n").unwrap_err();
        assert_eq!(e.issues[0].path, "config.lora_rank");
        assert_eq!(e.issues[0].line, Some(2));
    }

    #[test]
    fn syntax_errors_have_lines() {
        let e = parse("name: x\nconfig:\n  lora_rank: [1, 2\n").unwrap_err();
        assert!(e.issues[0].line.is_some());
        assert!(e.issues[0].message.starts_with("invalid YAML"));
        let e = Document::parse("{\"a\": 1,}", "t.json", Syntax::Json).unwrap_err();
        assert_eq!(e.issues[0].line, Some(1));
        assert!(e.issues[0].hint.as_deref().unwrap().contains("comma"));
    }

    #[test]
    fn empty_and_duplicate_keys_are_errors() {
        assert!(parse("").unwrap_err().issues[0].message.contains("empty"));
        assert!(
            parse("# only a comment\n").unwrap_err().issues[0]
                .message
                .contains("empty")
        );
        let e = parse("name: x\nname: y\n").unwrap_err();
        assert!(e.issues[0].message.contains("duplicate"));
    }

    #[test]
    fn array_items_and_anchors() {
        let d = parse("name: x\nbase: &b\n  lora_rank: 8\nconfig: *b\ntags: [a, b]\n");
        // `base` is unknown, but anchors resolve before that check.
        let e = d.unwrap_err();
        assert_eq!(e.issues[0].path, "base");
        let d = parse("name: x\nconfig:\n  <<: {lora_rank: 8}\n  learning_rate: 0.1\n").unwrap();
        assert_eq!(d.config.lora_rank, 8);
        let doc = Document::parse("a:\n  - x: 1\n  - x: 2\n", "t", Syntax::Yaml).unwrap();
        assert_eq!(doc.index.locate("a[1].x"), Some((3, 5)));
    }

    #[test]
    fn json_lines_are_indexed() {
        let doc = Document::parse(
            "{\n  \"name\": \"x\",\n  \"config\": {\"lora_rank\": -1}\n}",
            "t.json",
            Syntax::Json,
        )
        .unwrap();
        let e = doc.decode::<Doc>(|_| vec![]).unwrap_err();
        assert_eq!(e.issues[0].line, Some(3));
    }
}

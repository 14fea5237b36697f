//! Record layouts: which one a row is (alpaca, sharegpt, messages, prompt/completion,
//! text, text-to-SQL), whether it is well formed, and where its training target is.

use lora_spec::contracts::dataset::DetectedRecordFormat;

use crate::value::Val;

/// Whether a row's training target is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Present and not blank.
    Present,
    /// Present but empty or whitespace only.
    Empty,
    /// The field (or the assistant turn) is missing.
    Missing,
    /// The layout is unknown, so there is no target to check.
    NotApplicable,
}

/// A row's layout and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// The layout.
    pub format: DetectedRecordFormat,
    /// The target's state.
    pub target: TargetState,
    /// Name of the target field (for messages), e.g. `output` or `messages[-1].content`.
    pub target_field: &'static str,
    /// A structural problem that makes the row unusable (the row is then invalid).
    pub problem: Option<String>,
}

/// Keys that hold the question of a text-to-SQL pair.
const SQL_QUESTION: &[&str] = &["question", "nlq", "natural_language", "utterance"];
/// Keys that hold its SQL.
const SQL_TARGET: &[&str] = &["sql", "query", "sql_query", "SQL"];

fn text_state(v: Option<&Val<'_>>) -> TargetState {
    match v {
        None | Some(Val::Null) => TargetState::Missing,
        Some(Val::Str(s)) if s.trim().is_empty() => TargetState::Empty,
        Some(Val::List(l)) if l.is_empty() => TargetState::Empty,
        Some(_) => TargetState::Present,
    }
}

/// The text of a message content: a string, or the `text` parts of a content list.
pub fn content_text(v: &Val<'_>) -> Option<String> {
    match v {
        Val::Str(s) => Some(s.to_string()),
        Val::List(parts) => {
            let mut out = String::new();
            for p in parts {
                if let Some(t) = p.get("text").and_then(Val::as_str) {
                    out.push_str(t);
                } else if let Some(t) = p.as_str() {
                    out.push_str(t);
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// Checks a list of chat turns; returns the state of the last assistant turn.
fn check_turns(
    turns: &Val<'_>,
    field: &str,
    role_key: &str,
    content_key: &str,
    assistant: &[&str],
) -> Result<TargetState, String> {
    let list = turns.as_list().ok_or_else(|| {
        format!(
            "{field} is {} {}, expected a list of {{{role_key}, {content_key}}} turns",
            if matches!(turns, Val::Null) { "" } else { "a" },
            turns.type_name()
        )
    })?;
    if list.is_empty() {
        return Err(format!("{field} is an empty list"));
    }
    let mut last = TargetState::Missing;
    for (i, t) in list.iter().enumerate() {
        if t.as_map().is_none() {
            return Err(format!(
                "{field}[{i}] is a {}, expected an object",
                t.type_name()
            ));
        }
        let role = match t.get(role_key) {
            Some(Val::Str(r)) => r,
            Some(other) => {
                return Err(format!(
                    "{field}[{i}].{role_key} is a {}, expected a string",
                    other.type_name()
                ));
            }
            None => return Err(format!("{field}[{i}] has no {role_key:?}")),
        };
        let content = t.get(content_key);
        match content {
            None | Some(Val::Null | Val::Str(_) | Val::List(_)) => {}
            Some(other) => {
                return Err(format!(
                    "{field}[{i}].{content_key} is a {}, expected a string",
                    other.type_name()
                ));
            }
        }
        if assistant.contains(&role.as_ref()) {
            last = match content.and_then(content_text) {
                None => {
                    if t.get("tool_calls").is_some() {
                        TargetState::Present
                    } else {
                        TargetState::Missing
                    }
                }
                Some(s) if s.trim().is_empty() => TargetState::Empty,
                Some(_) => TargetState::Present,
            };
        }
    }
    Ok(last)
}

fn looks_like_sql(s: &str) -> bool {
    let t = s.trim_start().to_ascii_uppercase();
    ["SELECT", "WITH", "INSERT", "UPDATE", "DELETE"]
        .iter()
        .any(|k| t.starts_with(k))
}

/// Classifies one row (a map).
pub fn classify(v: &Val<'_>) -> Classified {
    let has = |k: &str| v.get(k).is_some();
    let out = |format, target, target_field, problem| Classified {
        format,
        target,
        target_field,
        problem,
    };
    if let Some(m) = v.get("messages") {
        return match check_turns(m, "messages", "role", "content", &["assistant"]) {
            Ok(t) => out(
                DetectedRecordFormat::Messages,
                t,
                "messages[assistant].content",
                None,
            ),
            Err(p) => out(
                DetectedRecordFormat::Messages,
                TargetState::Missing,
                "messages",
                Some(p),
            ),
        };
    }
    if let Some(c) = v.get("conversations") {
        // ShareGPT uses from/value; some exports use role/content under `conversations`.
        let (rk, ck) = match c.as_list().and_then(|l| l.first()) {
            Some(t) if t.get("role").is_some() => ("role", "content"),
            _ => ("from", "value"),
        };
        return match check_turns(
            c,
            "conversations",
            rk,
            ck,
            &["gpt", "assistant", "model", "chatgpt", "bing"],
        ) {
            Ok(t) => out(
                DetectedRecordFormat::Sharegpt,
                t,
                "conversations[gpt].value",
                None,
            ),
            Err(p) => out(
                DetectedRecordFormat::Sharegpt,
                TargetState::Missing,
                "conversations",
                Some(p),
            ),
        };
    }
    if has("instruction") && (has("output") || has("response")) {
        let (field, target) = if has("output") {
            ("output", text_state(v.get("output")))
        } else {
            ("response", text_state(v.get("response")))
        };
        return out(DetectedRecordFormat::Alpaca, target, field, None);
    }
    if SQL_QUESTION.iter().any(|k| has(k)) {
        if let Some(k) = SQL_TARGET.iter().find(|k| has(k)) {
            return out(
                DetectedRecordFormat::TextToSql,
                text_state(v.get(k)),
                k,
                None,
            );
        }
        // sql-create-context style: question + context (CREATE TABLE ...) + answer (SQL).
        let ctx_sql = v
            .get("context")
            .and_then(Val::as_str)
            .is_some_and(|c| c.to_ascii_uppercase().contains("CREATE TABLE"));
        let answer_sql = v
            .get("answer")
            .and_then(Val::as_str)
            .is_some_and(looks_like_sql);
        if has("answer") && (ctx_sql || answer_sql) {
            return out(
                DetectedRecordFormat::TextToSql,
                text_state(v.get("answer")),
                "answer",
                None,
            );
        }
    }
    if has("instruction") {
        // An alpaca row without its output.
        return out(
            DetectedRecordFormat::Alpaca,
            TargetState::Missing,
            "output",
            None,
        );
    }
    if has("prompt") && (has("completion") || !has("text")) {
        return out(
            DetectedRecordFormat::PromptCompletion,
            text_state(v.get("completion")),
            "completion",
            None,
        );
    }
    if has("text") {
        return out(
            DetectedRecordFormat::Text,
            text_state(v.get("text")),
            "text",
            None,
        );
    }
    out(
        DetectedRecordFormat::Unknown,
        TargetState::NotApplicable,
        "",
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Classified {
        let v: Val = serde_json::from_str(s).unwrap();
        classify(&v)
    }

    #[test]
    fn recognises_layouts_and_targets() {
        let a = c(r#"{"instruction":"x","input":"","output":"y"}"#);
        assert_eq!(
            (a.format, a.target),
            (DetectedRecordFormat::Alpaca, TargetState::Present)
        );
        let a = c(r#"{"instruction":"x","output":"  "}"#);
        assert_eq!(a.target, TargetState::Empty);
        let a = c(r#"{"instruction":"x","input":"y"}"#);
        assert_eq!(
            (a.format, a.target),
            (DetectedRecordFormat::Alpaca, TargetState::Missing)
        );
        let m = c(
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#,
        );
        assert_eq!(
            (m.format, m.target),
            (DetectedRecordFormat::Messages, TargetState::Present)
        );
        let m = c(r#"{"messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(m.target, TargetState::Missing);
        let m = c(r#"{"messages":[{"content":"hi"}]}"#);
        assert!(m.problem.unwrap().contains("messages[0] has no \"role\""));
        let m = c(r#"{"messages":"hi"}"#);
        assert!(m.problem.unwrap().contains("expected a list"));
        let s = c(r#"{"conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":""}]}"#);
        assert_eq!(
            (s.format, s.target),
            (DetectedRecordFormat::Sharegpt, TargetState::Empty)
        );
        let p = c(r#"{"prompt":"a","completion":"b"}"#);
        assert_eq!(p.format, DetectedRecordFormat::PromptCompletion);
        let t = c(r#"{"text":"abc"}"#);
        assert_eq!(t.format, DetectedRecordFormat::Text);
        let q = c(r#"{"question":"how many?","query":"SELECT 1","db_id":"x"}"#);
        assert_eq!(
            (q.format, q.target_field),
            (DetectedRecordFormat::TextToSql, "query")
        );
        let q = c(
            r#"{"question":"how many?","context":"CREATE TABLE t (a int)","answer":"SELECT count(*) FROM t"}"#,
        );
        assert_eq!(
            (q.format, q.target_field),
            (DetectedRecordFormat::TextToSql, "answer")
        );
        let u = c(r#"{"foo":1}"#);
        assert_eq!(u.format, DetectedRecordFormat::Unknown);
    }
}

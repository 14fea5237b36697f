//! The object-safe form of a skill and the registry that holds them.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use schemars::{JsonSchema, Schema, generate::SchemaSettings};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Skill, SkillContext, SkillError, StepResult};

/// The JSON schema of `T`, self-contained (subschemas inlined, no `$ref`),
/// as LLM tool-calling APIs want it.
pub fn schema_of<T: JsonSchema>() -> Schema {
    let mut settings = SchemaSettings::draft2020_12();
    settings.inline_subschemas = true;
    settings.into_generator().into_root_schema_for::<T>()
}

/// A skill behind JSON: what the registry stores and callers invoke by name.
///
/// Every [`Skill`] implements it; test doubles usually implement [`Skill`]
/// too, or this trait directly when they need to fake the schema.
#[async_trait]
pub trait ErasedSkill: Send + Sync {
    /// Stable machine name.
    fn name(&self) -> &str;
    /// Human / LLM description.
    fn description(&self) -> &str;
    /// Whether the skill wants an accelerator.
    fn requires_gpu(&self) -> bool;
    /// JSON schema of the input.
    fn input_schema(&self) -> Schema;
    /// JSON schema of the whole `StepResult` (with the typed `data`).
    fn output_schema(&self) -> Schema;
    /// Runs the skill on a JSON input. A malformed input is an `invalid_input`
    /// error naming the offending field.
    async fn call_json(
        &self,
        input: Value,
        ctx: &SkillContext,
    ) -> Result<StepResult<Value>, SkillError>;
}

#[async_trait]
impl<S: Skill> ErasedSkill for S {
    fn name(&self) -> &str {
        Skill::name(self)
    }

    fn description(&self) -> &str {
        Skill::description(self)
    }

    fn requires_gpu(&self) -> bool {
        Skill::requires_gpu(self)
    }

    fn input_schema(&self) -> Schema {
        schema_of::<S::Input>()
    }

    fn output_schema(&self) -> Schema {
        schema_of::<StepResult<S::Output>>()
    }

    async fn call_json(
        &self,
        input: Value,
        ctx: &SkillContext,
    ) -> Result<StepResult<Value>, SkillError> {
        let typed: S::Input = decode(input)?;
        let ctx = ctx.child(Skill::name(self));
        let out = self.run(typed, &ctx).await?;
        let data = serde_json::to_value(&out.data).map_err(|e| {
            SkillError::backend(format!("could not serialise the skill output: {e}"))
        })?;
        Ok(StepResult {
            data,
            artifacts: out.artifacts,
            output_text: out.output_text,
            metadata: out.metadata,
        })
    }
}

/// Deserialises a JSON value into `T`, naming the offending field on failure.
pub fn decode<T: serde::de::DeserializeOwned>(input: Value) -> Result<T, SkillError> {
    serde_path_to_error::deserialize(input).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let mut err = SkillError::invalid_input(inner);
        if path != "." && !path.is_empty() {
            err = err.with_field(path);
        }
        err.with_hint("see `lora-trainer schema` for the expected input")
    })
}

/// A registered skill's public facts (for `lora-trainer skills`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SkillInfo {
    /// Stable name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Whether it wants an accelerator.
    pub requires_gpu: bool,
}

/// Skills by name. Callers find skills here, never by naming a concrete type,
/// so any implementation can be swapped (a test double, a remote proxy).
#[derive(Clone, Default)]
pub struct SkillRegistry {
    skills: BTreeMap<String, Arc<dyn ErasedSkill>>,
}

impl std::fmt::Debug for SkillRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.skills.keys()).finish()
    }
}

impl SkillRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `skill` under its name, replacing any skill of that name.
    /// Returns the replaced skill, if any.
    pub fn register<S: ErasedSkill + 'static>(&mut self, skill: S) -> Option<Arc<dyn ErasedSkill>> {
        self.register_arc(Arc::new(skill))
    }

    /// Registers an already shared skill.
    pub fn register_arc(&mut self, skill: Arc<dyn ErasedSkill>) -> Option<Arc<dyn ErasedSkill>> {
        self.skills.insert(skill.name().to_string(), skill)
    }

    /// Builder form of [`register`](Self::register).
    pub fn with<S: ErasedSkill + 'static>(mut self, skill: S) -> Self {
        self.register(skill);
        self
    }

    /// The skill named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn ErasedSkill>> {
        self.skills.get(name).cloned()
    }

    /// Whether a skill of that name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.skills.contains_key(name)
    }

    /// Names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.skills.keys().cloned().collect()
    }

    /// Every skill, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn ErasedSkill>> {
        self.skills.values()
    }

    /// Public facts of every skill, sorted by name.
    pub fn list(&self) -> Vec<SkillInfo> {
        self.skills
            .values()
            .map(|s| SkillInfo {
                name: s.name().to_string(),
                description: s.description().to_string(),
                requires_gpu: s.requires_gpu(),
            })
            .collect()
    }

    fn lookup(&self, name: &str) -> Result<Arc<dyn ErasedSkill>, SkillError> {
        self.get(name).ok_or_else(|| {
            let known = self.names().join(", ");
            SkillError::not_found(format!("no skill named `{name}` is registered"))
                .with_hint(format!("registered skills: {known}"))
        })
    }

    /// Calls the skill `name` with a JSON input.
    pub async fn call_json(
        &self,
        name: &str,
        input: Value,
        ctx: &SkillContext,
    ) -> Result<StepResult<Value>, SkillError> {
        self.lookup(name)?.call_json(input, ctx).await
    }

    /// Calls the skill `name` with a typed input and decodes its typed output.
    /// This is how the orchestrator uses skills without naming their crates:
    /// the contract types live in `lora-spec`, the implementations anywhere.
    pub async fn call<I: Serialize + Sync, O: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        input: &I,
        ctx: &SkillContext,
    ) -> Result<StepResult<O>, SkillError> {
        let value = serde_json::to_value(input).map_err(|e| {
            SkillError::invalid_input(format!("could not serialise the input of `{name}`: {e}"))
        })?;
        let out = self.call_json(name, value, ctx).await?;
        let StepResult {
            data,
            artifacts,
            output_text,
            metadata,
        } = out;
        let data: O = decode(data).map_err(|e| {
            SkillError::backend(format!(
                "skill `{name}` returned data that does not match its contract: {e}"
            ))
        })?;
        Ok(StepResult {
            data,
            artifacts,
            output_text,
            metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    /// Input of the echo test skill.
    #[derive(Debug, Deserialize, Serialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct EchoIn {
        /// Text to repeat.
        text: String,
        /// How often.
        times: u32,
    }

    #[derive(Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
    struct EchoOut {
        echoed: String,
    }

    struct Echo;

    #[async_trait]
    impl Skill for Echo {
        type Input = EchoIn;
        type Output = EchoOut;
        fn name(&self) -> &'static str {
            "echo"
        }
        fn description(&self) -> &'static str {
            "Repeats text."
        }
        async fn run(
            &self,
            input: EchoIn,
            ctx: &SkillContext,
        ) -> Result<StepResult<EchoOut>, SkillError> {
            ctx.check_cancelled()?;
            Ok(StepResult::new(EchoOut {
                echoed: input.text.repeat(input.times as usize),
            })
            .with_meta("times", input.times))
        }
    }

    struct FakeEcho;

    #[async_trait]
    impl Skill for FakeEcho {
        type Input = EchoIn;
        type Output = EchoOut;
        fn name(&self) -> &'static str {
            "echo"
        }
        fn description(&self) -> &'static str {
            "A double."
        }
        async fn run(
            &self,
            _: EchoIn,
            _: &SkillContext,
        ) -> Result<StepResult<EchoOut>, SkillError> {
            Ok(StepResult::new(EchoOut {
                echoed: "fake".into(),
            }))
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn json_call_round_trips() {
        let reg = SkillRegistry::new().with(Echo);
        let ctx = SkillContext::new(".");
        let out = rt()
            .block_on(reg.call_json("echo", serde_json::json!({"text": "ab", "times": 2}), &ctx))
            .unwrap();
        assert_eq!(out.data, serde_json::json!({"echoed": "abab"}));
        assert_eq!(out.metadata["times"], 2);
    }

    #[test]
    fn typed_call_decodes_output() {
        let reg = SkillRegistry::new().with(Echo);
        let ctx = SkillContext::new(".");
        let out: StepResult<EchoOut> = rt()
            .block_on(reg.call(
                "echo",
                &EchoIn {
                    text: "x".into(),
                    times: 3,
                },
                &ctx,
            ))
            .unwrap();
        assert_eq!(out.data.echoed, "xxx");
    }

    #[test]
    fn bad_input_names_the_field() {
        let reg = SkillRegistry::new().with(Echo);
        let ctx = SkillContext::new(".");
        let err = rt()
            .block_on(reg.call_json(
                "echo",
                serde_json::json!({"text": "a", "times": "two"}),
                &ctx,
            ))
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert_eq!(err.field.as_deref(), Some("times"));
    }

    #[test]
    fn unknown_skill_is_not_found_with_the_known_names() {
        let reg = SkillRegistry::new().with(Echo);
        let ctx = SkillContext::new(".");
        let err = rt()
            .block_on(reg.call_json("nope", serde_json::json!({}), &ctx))
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.hint.unwrap().contains("echo"));
    }

    #[test]
    fn registering_again_swaps_the_implementation() {
        let mut reg = SkillRegistry::new().with(Echo);
        let old = reg.register(FakeEcho);
        assert!(old.is_some());
        let ctx = SkillContext::new(".");
        let out = rt()
            .block_on(reg.call_json("echo", serde_json::json!({"text": "a", "times": 1}), &ctx))
            .unwrap();
        assert_eq!(out.data["echoed"], "fake");
        assert_eq!(reg.list()[0].description, "A double.");
    }

    #[test]
    fn schemas_are_self_contained_objects_with_descriptions() {
        let s = Echo.input_schema();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["type"], "object");
        assert_eq!(v["properties"]["text"]["description"], "Text to repeat.");
        let out = serde_json::to_value(Echo.output_schema()).unwrap();
        assert!(out["properties"]["data"].is_object());
        assert!(!out.to_string().contains("$ref"));
    }

    #[test]
    fn cancelled_context_stops_the_skill() {
        let reg = SkillRegistry::new().with(Echo);
        let ctx = SkillContext::new(".");
        ctx.cancel_token().cancel();
        let err = rt()
            .block_on(reg.call_json("echo", serde_json::json!({"text": "a", "times": 1}), &ctx))
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Cancelled);
    }
}

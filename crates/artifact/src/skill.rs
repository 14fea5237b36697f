//! The two skills over the store: `artifact_store` (seed 001 §7: store an
//! adapter as the next version) and `artifact_registry` (list, get, best,
//! filter, delete, gc, verify). Both run their blocking file and SQLite work
//! on tokio's blocking pool.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use lora_skill::{Skill, SkillContext, SkillError, StepResult};
use lora_spec::contracts::artifact::{
    ARTIFACT_REGISTRY, ArtifactRegistryInput, ArtifactRegistryOutput, ArtifactStoreInput,
    ArtifactStoreOutput, DEFAULT_EXPERIMENT, DEFAULT_STORE_ROOT, RegistryOp,
};
use lora_spec::contracts::names;

use crate::store::{ArtifactStore, GcOptions};

fn store_root(ctx: &SkillContext, root: Option<&str>) -> PathBuf {
    ctx.resolve(root.unwrap_or(DEFAULT_STORE_ROOT))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SkillError> + Send + 'static,
) -> Result<T, SkillError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SkillError::backend(format!("artifact task failed: {e}")))?
}

/// `artifact_store`: stores an adapter folder as the next version of an experiment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ArtifactSkill;

#[async_trait]
impl Skill for ArtifactSkill {
    type Input = ArtifactStoreInput;
    type Output = ArtifactStoreOutput;

    fn name(&self) -> &'static str {
        names::ARTIFACT
    }

    fn description(&self) -> &'static str {
        "Store an adapter folder as the next version (v1, v2, ...) of an experiment, with its trial, \
         metrics and tags; returns the version, the adapter's SHA-256 and the stored read-only copy. \
         Identical files and adapters are stored once."
    }

    async fn run(
        &self,
        input: ArtifactStoreInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<ArtifactStoreOutput>, SkillError> {
        let ctx = ctx.clone();
        blocking(move || {
            let root = store_root(&ctx, input.store_root.as_deref());
            let mut store = ArtifactStore::open(&root)?;
            let out = store.store(&input, &ctx)?;
            let text = if out.reused {
                format!(
                    "{}/{} already holds this adapter ({}); nothing written",
                    out.experiment_id, out.version, out.adapter_hash
                )
            } else {
                format!(
                    "stored {} as {}/{} ({} files, {} bytes, {} new) at {}",
                    input.adapter_path,
                    out.experiment_id,
                    out.version,
                    out.files,
                    out.bytes,
                    out.bytes_written,
                    out.stored_path
                )
            };
            Ok(StepResult::new(out.clone())
                .with_artifact(out.stored_path.clone())
                .with_text(text)
                .with_meta("experiment_id", out.experiment_id.clone())
                .with_meta("version", out.version.clone())
                .with_meta("reused", out.reused)
                .with_meta("bytes_written", out.bytes_written)
                .with_meta("store_root", store.root().display().to_string()))
        })
        .await
    }
}

/// `artifact_registry`: queries and maintains the store.
#[derive(Debug, Default, Clone, Copy)]
pub struct ArtifactRegistrySkill;

#[async_trait]
impl Skill for ArtifactRegistrySkill {
    type Input = ArtifactRegistryInput;
    type Output = ArtifactRegistryOutput;

    fn name(&self) -> &'static str {
        ARTIFACT_REGISTRY
    }

    fn description(&self) -> &'static str {
        "Query and maintain the adapter store: list versions, get one (v3, latest, best:eval_loss), \
         the best by a metric, filter by tags and metric bounds, delete a version, garbage-collect \
         unreferenced files, verify stored files against their SHA-256."
    }

    async fn run(
        &self,
        input: ArtifactRegistryInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<ArtifactRegistryOutput>, SkillError> {
        let ctx = ctx.clone();
        blocking(move || run_registry(input, &ctx)).await
    }
}

fn required<'a>(
    value: &'a Option<String>,
    field: &str,
    op: &str,
    example: &str,
) -> Result<&'a str, SkillError> {
    value
        .as_deref()
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| {
            SkillError::invalid_input(format!("is required by op `{op}`"))
                .with_field(field)
                .with_hint(format!("for example \"{field}\": \"{example}\""))
        })
}

fn run_registry(
    input: ArtifactRegistryInput,
    ctx: &SkillContext,
) -> Result<StepResult<ArtifactRegistryOutput>, SkillError> {
    use ArtifactRegistryOutput as O;
    let open = || ArtifactStore::open_existing(store_root(ctx, input.store_root.as_deref()));
    let exp = input
        .experiment_id
        .clone()
        .unwrap_or_else(|| DEFAULT_EXPERIMENT.to_string());
    let (out, text) = match input.op {
        RegistryOp::List | RegistryOp::Filter => {
            let versions = open()?.filter(&input.filter())?;
            let t = format!("{} versions", versions.len());
            if input.op == RegistryOp::List {
                (O::List { versions }, t)
            } else {
                (O::Filter { versions }, t)
            }
        }
        RegistryOp::Get => {
            let reference = required(&input.reference, "reference", "get", "latest")?;
            let version = open()?.get(reference, &exp)?;
            let t = format!(
                "{}/{} at {}",
                version.experiment_id, version.version, version.stored_path
            );
            (O::Get { version }, t)
        }
        RegistryOp::Best => {
            let metric = required(&input.metric, "metric", "best", "eval_loss")?;
            let (version, candidates) = open()?.best_of(&input.filter(), metric, input.goal)?;
            let t = match &version {
                Some(v) => format!(
                    "best {metric}: {}/{} ({}) of {candidates} candidates",
                    v.experiment_id,
                    v.version,
                    v.metrics.get(metric).copied().unwrap_or(f64::NAN)
                ),
                None => format!("no version has metric {metric}"),
            };
            (
                O::Best {
                    version,
                    candidates,
                },
                t,
            )
        }
        RegistryOp::Delete => {
            let reference = required(&input.reference, "reference", "delete", "v3")?;
            let deleted = open()?.delete(reference, &exp)?;
            let t = format!(
                "deleted {}/{} from the index; run gc to free its files",
                deleted.experiment_id, deleted.version
            );
            (O::Delete { deleted }, t)
        }
        RegistryOp::Gc => {
            let wait = match input.wait_seconds {
                None => Duration::from_secs(60),
                Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s.min(86_400.0)),
                Some(s) => {
                    return Err(SkillError::invalid_input(format!(
                        "must be a number of seconds >= 0 (got {s})"
                    ))
                    .with_field("wait_seconds"));
                }
            };
            let dry_run = input.dry_run;
            let report = open()?.gc(GcOptions { dry_run, wait }, ctx)?;
            let t = format!(
                "{}{} adapters, {} blobs, {} temporary files, {} bytes",
                if dry_run { "would remove " } else { "removed " },
                report.adapters_removed,
                report.blobs_removed,
                report.temp_removed,
                report.bytes_freed
            );
            (O::Gc { report }, t)
        }
        RegistryOp::Verify => {
            let report = open()?.verify(input.reference.as_deref(), &exp, ctx)?;
            let t = if report.ok {
                format!(
                    "ok: {} versions, {} blobs, {} bytes hashed",
                    report.versions_checked, report.blobs_checked, report.bytes_hashed
                )
            } else {
                format!("{} problems found", report.problems.len())
            };
            (O::Verify { report }, t)
        }
    };
    Ok(StepResult::new(out).with_text(text))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;
    use lora_skill::{ErrorKind, MemorySink, SkillRegistry};
    use serde_json::json;
    use std::fs;

    fn registry() -> SkillRegistry {
        let mut reg = SkillRegistry::new();
        crate::register(&mut reg);
        reg
    }

    #[tokio::test]
    async fn seed_input_stores_through_the_registry_and_queries_work() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("outputs/trial_1/adapter");
        fs::create_dir_all(&a).unwrap();
        fs::write(a.join("adapter_config.json"), b"{}").unwrap();
        fs::write(a.join("adapter_model.safetensors"), vec![7u8; 1000]).unwrap();
        let sink = MemorySink::new();
        let ctx = SkillContext::new(tmp.path()).with_sink(sink.clone());
        let reg = registry();
        // Seed 001 §7's example input, verbatim.
        let out = reg
            .call_json(
                names::ARTIFACT,
                json!({
                    "adapter_path": "outputs/trial_1/adapter",
                    "trial_id": 1,
                    "metrics": {"eval_loss": 0.42},
                    "tags": ["lora", "instruction"]
                }),
                &ctx,
            )
            .await
            .unwrap();
        assert_eq!(out.data["version"], "v1");
        assert_eq!(out.data["adapter_hash"].as_str().unwrap().len(), 64);
        let stored = out.data["stored_path"].as_str().unwrap();
        assert!(stored.starts_with(tmp.path().join("artifacts").to_str().unwrap()));
        assert_eq!(out.artifacts, [stored.to_string()]);
        assert!(!sink.events().is_empty());

        let best = reg
            .call_json(
                ARTIFACT_REGISTRY,
                json!({"op": "best", "metric": "eval_loss"}),
                &ctx,
            )
            .await
            .unwrap();
        assert_eq!(best.data["op"], "best");
        assert_eq!(best.data["version"]["version"], "v1");
        assert_eq!(best.data["version"]["tags"], json!(["instruction", "lora"]));
        let verify = reg
            .call_json(ARTIFACT_REGISTRY, json!({"op": "verify"}), &ctx)
            .await
            .unwrap();
        assert_eq!(verify.data["report"]["ok"], true);
        let listed = reg
            .call_json(
                ARTIFACT_REGISTRY,
                json!({"op": "filter", "tags": ["nope"]}),
                &ctx,
            )
            .await
            .unwrap();
        assert_eq!(listed.data["versions"], json!([]));
        let deleted = reg
            .call_json(
                ARTIFACT_REGISTRY,
                json!({"op": "delete", "reference": "latest"}),
                &ctx,
            )
            .await
            .unwrap();
        assert_eq!(deleted.data["deleted"]["version"], "v1");
        let gc = reg
            .call_json(ARTIFACT_REGISTRY, json!({"op": "gc"}), &ctx)
            .await
            .unwrap();
        assert_eq!(gc.data["report"]["blobs_removed"], 2);
    }

    #[tokio::test]
    async fn errors_name_the_field_and_the_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = SkillContext::new(tmp.path());
        let reg = registry();
        let e = reg
            .call_json(
                names::ARTIFACT,
                json!({"adapter_path": "nope", "trial_id": 1}),
                &ctx,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.to_string().contains("nope"), "{e}");
        let e = reg
            .call_json(
                ARTIFACT_REGISTRY,
                json!({"op": "list", "store_root": "elsewhere"}),
                &ctx,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.field.as_deref(), Some("store_root"));
        let e = reg
            .call_json(
                ARTIFACT_REGISTRY,
                json!({"op": "gc", "wait_seconds": -1.0}),
                &ctx,
            )
            .await
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("wait_seconds"));
        let e = reg
            .call_json(ARTIFACT_REGISTRY, json!({"op": "compact"}), &ctx)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        let e = reg
            .call_json(ARTIFACT_REGISTRY, json!({"op": "best"}), &ctx)
            .await
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("metric"));
        assert!(e.hint.unwrap().contains("eval_loss"));
    }
}

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
    ArtifactStoreOutput, DEFAULT_STORE_ROOT,
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

fn run_registry(
    input: ArtifactRegistryInput,
    ctx: &SkillContext,
) -> Result<StepResult<ArtifactRegistryOutput>, SkillError> {
    use ArtifactRegistryInput as I;
    use ArtifactRegistryOutput as O;
    let open =
        |root: &Option<String>| ArtifactStore::open_existing(store_root(ctx, root.as_deref()));
    let (out, text) = match input {
        I::List {
            store_root,
            experiment_id,
        } => {
            let versions = open(&store_root)?.list(experiment_id.as_deref())?;
            let t = format!("{} versions", versions.len());
            (O::List { versions }, t)
        }
        I::Get {
            store_root,
            experiment_id,
            reference,
        } => {
            let version = open(&store_root)?.get(&reference, &experiment_id)?;
            let t = format!(
                "{}/{} at {}",
                version.experiment_id, version.version, version.stored_path
            );
            (O::Get { version }, t)
        }
        I::Best {
            store_root,
            experiment_id,
            metric,
            goal,
            tags,
        } => {
            let (version, candidates) =
                open(&store_root)?.best(experiment_id.as_deref(), &metric, goal, &tags)?;
            let t = match &version {
                Some(v) => format!(
                    "best {metric}: {}/{} ({}) of {candidates} candidates",
                    v.experiment_id,
                    v.version,
                    v.metrics.get(&metric).copied().unwrap_or(f64::NAN)
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
        I::Filter { store_root, filter } => {
            let versions = open(&store_root)?.filter(&filter)?;
            let t = format!("{} matching versions", versions.len());
            (O::Filter { versions }, t)
        }
        I::Delete {
            store_root,
            experiment_id,
            reference,
        } => {
            let deleted = open(&store_root)?.delete(&reference, &experiment_id)?;
            let t = format!(
                "deleted {}/{} from the index; run gc to free its files",
                deleted.experiment_id, deleted.version
            );
            (O::Delete { deleted }, t)
        }
        I::Gc {
            store_root,
            dry_run,
            wait_seconds,
        } => {
            let wait = match wait_seconds {
                None => Duration::from_secs(60),
                Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s.min(86_400.0)),
                Some(s) => {
                    return Err(SkillError::invalid_input(format!(
                        "must be a number of seconds >= 0 (got {s})"
                    ))
                    .with_field("wait_seconds"));
                }
            };
            let report = open(&store_root)?.gc(GcOptions { dry_run, wait }, ctx)?;
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
        I::Verify {
            store_root,
            reference,
            experiment_id,
        } => {
            let report = open(&store_root)?.verify(reference.as_deref(), &experiment_id, ctx)?;
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

//! `lora-trainer artifacts list|show|verify|gc|delete|store`: the adapter
//! store (lora-artifact) for people (tables) and scripts (`--json`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use lora_artifact::{ArtifactStore, GcOptions};
use lora_skill::SkillContext;
use lora_spec::contracts::artifact::{
    ArtifactStoreInput, ArtifactVersion, DEFAULT_EXPERIMENT, DEFAULT_STORE_ROOT, VersionFilter,
};

use crate::exit::{Failed, Usage};
use crate::output;

/// `artifacts` options.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The store folder.
    #[arg(long, global = true, default_value = DEFAULT_STORE_ROOT)]
    pub store: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

/// The `artifacts` subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// List stored versions (all experiments unless --experiment), oldest first.
    List {
        /// Only this experiment.
        #[arg(long, short)]
        experiment: Option<String>,
        /// Only versions carrying this tag (repeatable: all must match).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Only versions with METRIC <= VALUE, e.g. `eval_loss=0.5` (repeatable).
        #[arg(long = "max", value_name = "METRIC=VALUE")]
        max: Vec<String>,
        /// Only versions with METRIC >= VALUE, e.g. `accuracy=0.8` (repeatable).
        #[arg(long = "min", value_name = "METRIC=VALUE")]
        min: Vec<String>,
    },
    /// Show one version: `v3`, `latest`, `best:eval_loss`, `best:accuracy:max`, `exp/v3`.
    Show {
        /// The version.
        reference: String,
        /// The experiment a bare reference is looked up in.
        #[arg(long, short, default_value = DEFAULT_EXPERIMENT)]
        experiment: String,
    },
    /// Re-hash stored files and report corruption by path (exit 1 when any).
    Verify {
        /// Only this version (all when absent).
        reference: Option<String>,
        /// The experiment a bare reference is looked up in.
        #[arg(long, short, default_value = DEFAULT_EXPERIMENT)]
        experiment: String,
    },
    /// Remove files no version references and leftovers of interrupted stores.
    Gc {
        /// Say what would go without removing anything.
        #[arg(long)]
        dry_run: bool,
        /// Seconds to wait for running stores to finish.
        #[arg(long, default_value_t = 60.0)]
        wait: f64,
    },
    /// Remove a version from the index (its files go at the next gc).
    Delete {
        /// The version.
        reference: String,
        /// The experiment a bare reference is looked up in.
        #[arg(long, short, default_value = DEFAULT_EXPERIMENT)]
        experiment: String,
    },
    /// Store an adapter folder as the next version of an experiment.
    Store {
        /// The adapter folder.
        adapter: PathBuf,
        /// The trial that produced it.
        #[arg(long, default_value_t = 0)]
        trial: u32,
        /// The experiment.
        #[arg(long, short, default_value = DEFAULT_EXPERIMENT)]
        experiment: String,
        /// A metric, `NAME=VALUE` (repeatable).
        #[arg(long = "metric", value_name = "NAME=VALUE")]
        metrics: Vec<String>,
        /// A tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The version it was trained from (`v2`, `exp/v5`).
        #[arg(long)]
        parent: Option<String>,
    },
}

fn parse_kv(flag: &str, items: &[String]) -> anyhow::Result<Vec<(String, f64)>> {
    items
        .iter()
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| Usage(format!("--{flag} {s:?}: expected NAME=VALUE")))?;
            let x: f64 = v
                .trim()
                .parse()
                .map_err(|_| Usage(format!("--{flag} {s:?}: {v:?} is not a number")))?;
            Ok((k.trim().to_string(), x))
        })
        .collect()
}

fn num(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e6) {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn metrics_cell(v: &ArtifactVersion) -> String {
    v.metrics
        .iter()
        .map(|(k, x)| format!("{k}={}", num(*x)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn when(created_at: &str) -> String {
    // 2025-01-31T12:34:56.789Z -> 2025-01-31 12:34:56
    created_at.get(..19).unwrap_or(created_at).replace('T', " ")
}

fn context() -> SkillContext {
    let dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    SkillContext::new(dir)
        .with_sink(crate::render::BarSink::new(false))
        .with_cancel(crate::render::ctrl_c_token())
}

/// Runs the command.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let root = args.store.clone();
    let json = args.json;
    // The store is blocking file and SQLite work: keep it off the async workers.
    tokio::task::spawn_blocking(move || run_blocking(root, json, args.command))
        .await
        .context("the artifacts task failed")?
}

fn run_blocking(root: PathBuf, json: bool, cmd: Cmd) -> anyhow::Result<()> {
    let ctx = context();
    match cmd {
        Cmd::List {
            experiment,
            tags,
            max,
            min,
        } => {
            let store =
                ArtifactStore::open_existing(&root).map_err(lora_skill::SkillError::from)?;
            let filter = VersionFilter {
                experiment_id: experiment,
                tags,
                metric_max: parse_kv("max", &max)?.into_iter().collect(),
                metric_min: parse_kv("min", &min)?.into_iter().collect(),
                ..VersionFilter::default()
            };
            let versions = store
                .filter(&filter)
                .map_err(lora_skill::SkillError::from)?;
            if json {
                return output::json(&versions);
            }
            let rows = versions
                .iter()
                .map(|v| {
                    vec![
                        v.experiment_id.clone(),
                        v.version.clone(),
                        v.trial_id.to_string(),
                        metrics_cell(v),
                        v.tags.join(", "),
                        size(v.bytes),
                        when(&v.created_at),
                        v.adapter_hash[..12].to_string(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "experiment",
                    "version",
                    "trial",
                    "metrics",
                    "tags",
                    "size",
                    "created (UTC)",
                    "sha256",
                ],
                rows,
            )?;
            output::line(&format!(
                "{} versions in {}",
                versions.len(),
                store.root().display()
            ))
        }
        Cmd::Show {
            reference,
            experiment,
        } => {
            let store =
                ArtifactStore::open_existing(&root).map_err(lora_skill::SkillError::from)?;
            let v = store
                .get(&reference, &experiment)
                .map_err(lora_skill::SkillError::from)?;
            let files = store
                .adapter_files(&v.adapter_hash)
                .map_err(lora_skill::SkillError::from)?;
            if json {
                return output::json(&serde_json::json!({"version": v, "files": files}));
            }
            let mut rows = vec![
                vec![
                    "version".into(),
                    format!("{}/{}", v.experiment_id, v.version),
                ],
                vec!["trial".into(), v.trial_id.to_string()],
                vec!["adapter_hash".into(), v.adapter_hash.clone()],
                vec!["stored_path".into(), v.stored_path.clone()],
                vec!["created".into(), v.created_at.clone()],
                vec![
                    "parent".into(),
                    v.parent.clone().unwrap_or_else(|| "-".into()),
                ],
                vec!["tags".into(), v.tags.join(", ")],
                vec![
                    "size".into(),
                    format!("{} in {} files", size(v.bytes), v.files),
                ],
            ];
            for (k, x) in &v.metrics {
                rows.push(vec![format!("metric {k}"), num(*x)]);
            }
            if !v.metadata.is_empty() {
                rows.push(vec![
                    "metadata".into(),
                    serde_json::to_string(&v.metadata).unwrap_or_default(),
                ]);
            }
            output::table(&["field", "value"], rows)?;
            let rows = files
                .iter()
                .map(|f| vec![f.path.clone(), size(f.size), f.sha256.clone()])
                .collect();
            output::table(&["file", "size", "sha256"], rows)
        }
        Cmd::Verify {
            reference,
            experiment,
        } => {
            let store =
                ArtifactStore::open_existing(&root).map_err(lora_skill::SkillError::from)?;
            let report = store
                .verify(reference.as_deref(), &experiment, &ctx)
                .map_err(lora_skill::SkillError::from)?;
            if json {
                output::json(&report)?;
            } else {
                if !report.problems.is_empty() {
                    let rows = report
                        .problems
                        .iter()
                        .map(|p| {
                            vec![
                                serde_json::to_value(p.kind)
                                    .ok()
                                    .and_then(|k| k.as_str().map(String::from))
                                    .unwrap_or_default(),
                                p.path.clone(),
                                p.versions.join(", "),
                                p.message.clone(),
                            ]
                        })
                        .collect();
                    output::table(&["problem", "path", "versions", "what"], rows)?;
                }
                output::line(&format!(
                    "{}: {} versions, {} adapters, {} blobs, {} hashed",
                    if report.ok { "ok" } else { "CORRUPT" },
                    report.versions_checked,
                    report.adapters_checked,
                    report.blobs_checked,
                    size(report.bytes_hashed)
                ))?;
            }
            if report.ok {
                Ok(())
            } else {
                Err(Failed(format!(
                    "verify found {} problems; re-store the affected versions from their sources",
                    report.problems.len()
                ))
                .into())
            }
        }
        Cmd::Gc { dry_run, wait } => {
            if !(wait.is_finite() && wait >= 0.0) {
                return Err(
                    Usage(format!("--wait {wait}: must be a number of seconds >= 0")).into(),
                );
            }
            let mut store =
                ArtifactStore::open_existing(&root).map_err(lora_skill::SkillError::from)?;
            let report = store
                .gc(
                    GcOptions {
                        dry_run,
                        wait: Duration::from_secs_f64(wait.min(86_400.0)),
                    },
                    &ctx,
                )
                .map_err(lora_skill::SkillError::from)?;
            if json {
                return output::json(&report);
            }
            if dry_run {
                for p in &report.removed {
                    output::line(&format!("would remove {p}"))?;
                }
            }
            output::table(
                &["", "count"],
                vec![
                    vec![
                        "adapter folders".into(),
                        report.adapters_removed.to_string(),
                    ],
                    vec!["blobs".into(), report.blobs_removed.to_string()],
                    vec![
                        "temporary leftovers".into(),
                        report.temp_removed.to_string(),
                    ],
                    vec!["space freed".into(), size(report.bytes_freed)],
                ],
            )?;
            output::line(if dry_run {
                "dry run: nothing was removed"
            } else {
                "done"
            })
        }
        Cmd::Delete {
            reference,
            experiment,
        } => {
            let mut store =
                ArtifactStore::open_existing(&root).map_err(lora_skill::SkillError::from)?;
            let v = store
                .delete(&reference, &experiment)
                .map_err(lora_skill::SkillError::from)?;
            if json {
                return output::json(&v);
            }
            output::line(&format!(
                "deleted {}/{} from the index; `lora-trainer artifacts gc` frees its files",
                v.experiment_id, v.version
            ))
        }
        Cmd::Store {
            adapter,
            trial,
            experiment,
            metrics,
            tags,
            parent,
        } => {
            let mut input = ArtifactStoreInput::new(adapter.display().to_string(), trial);
            input.experiment_id = experiment;
            input.metrics = parse_kv("metric", &metrics)?.into_iter().collect();
            input.tags = tags;
            input.parent = parent;
            let mut store = ArtifactStore::open(&root).map_err(lora_skill::SkillError::from)?;
            let out = store
                .store(&input, &ctx)
                .map_err(lora_skill::SkillError::from)?;
            if json {
                return output::json(&out);
            }
            output::table(
                &["field", "value"],
                vec![
                    vec![
                        "version".into(),
                        format!("{}/{}", out.experiment_id, out.version),
                    ],
                    vec!["adapter_hash".into(), out.adapter_hash.clone()],
                    vec!["stored_path".into(), out.stored_path.clone()],
                    vec![
                        "size".into(),
                        format!("{} in {} files", size(out.bytes), out.files),
                    ],
                    vec!["written".into(), size(out.bytes_written)],
                    vec!["reused".into(), out.reused.to_string()],
                ],
            )
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn key_values_and_sizes() {
        let kv = parse_kv("max", &["eval_loss=0.5".into(), " acc = 1e-1".into()]).unwrap();
        assert_eq!(
            kv,
            [("eval_loss".to_string(), 0.5), ("acc".to_string(), 0.1)]
        );
        assert!(parse_kv("max", &["eval_loss".into()]).is_err());
        assert!(parse_kv("max", &["eval_loss=low".into()]).is_err());
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(when("2025-01-31T12:34:56.789Z"), "2025-01-31 12:34:56");
    }
}

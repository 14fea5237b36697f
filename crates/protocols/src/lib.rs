//! Research protocols (seed 001 §9) as libraries and registered skills:
//!
//! - [`ablation`]: `generate_configs(base, param, values)`, grids (products),
//!   seed 003 presets, the results table and a metric-vs-value SVG plot;
//! - [`curriculum`]: `build_stages` from named files or by a difficulty score;
//! - [`ensemble`]: `generate_diverse_configs(base, n)` and
//!   `compute_merge_weights(members, inverse_loss | uniform | softmax, temperature)`;
//! - standard: N independent trials from the HPO skill ([`skills::StandardSkill`]);
//! - [`manifest`]: `create_manifest(spec, state, experiment_id)`, save, load, verify.
//!
//! No libtorch.
#![cfg_attr(test, allow(clippy::unwrap_used))] // Tests may unwrap; library code may not.

pub mod ablation;
pub mod curriculum;
pub mod ensemble;
mod error;
pub mod manifest;
pub mod skills;

pub use error::ProtocolError;
pub use skills::{AblationSkill, CurriculumSkill, EnsembleSkill, ManifestSkill, StandardSkill};

/// Registers the five protocol skills.
pub fn register(reg: &mut lora_skill::SkillRegistry) {
    reg.register(AblationSkill);
    reg.register(CurriculumSkill);
    reg.register(EnsembleSkill);
    reg.register(StandardSkill);
    reg.register(ManifestSkill);
}

#[cfg(test)]
mod tests {
    use lora_skill::{ErrorKind, SkillContext, SkillRegistry};
    use lora_spec::contracts::names;
    use serde_json::json;

    fn reg() -> SkillRegistry {
        let mut r = SkillRegistry::new();
        super::register(&mut r);
        r
    }

    #[tokio::test]
    async fn every_protocol_is_a_registered_skill_with_a_schema() {
        let r = reg();
        for n in [
            names::ABLATION,
            names::CURRICULUM,
            names::ENSEMBLE,
            names::STANDARD,
            names::MANIFEST,
        ] {
            let s = r.get(n).unwrap();
            assert!(
                s.input_schema()
                    .as_object()
                    .is_some_and(|o| o.contains_key("properties")),
                "{n}"
            );
        }
    }

    #[tokio::test]
    async fn ablation_writes_configs_table_and_plot() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = SkillContext::new(dir.path());
        let r = reg();
        let out = r
            .get(names::ABLATION)
            .unwrap()
            .call_json(
                json!({"param": "lora_rank", "values": [4, 8, 16], "output_dir": "abl"}),
                &ctx,
            )
            .await
            .unwrap();
        assert_eq!(out.data["configs"].as_array().unwrap().len(), 3);
        assert_eq!(out.artifacts.len(), 3);
        let first: lora_spec::trial::TrialConfig =
            serde_json::from_str(&std::fs::read_to_string(&out.artifacts[0]).unwrap()).unwrap();
        assert_eq!(first.lora_rank, 4);
        let out = r
            .get(names::ABLATION)
            .unwrap()
            .call_json(
                json!({"param": "lora_rank", "values": [4, 8], "output_dir": "abl",
                       "results": [{"trial_id": 1, "values": {"lora_rank": 16}, "baseline": true, "metric": 1.0},
                                   {"trial_id": 2, "values": {"lora_rank": 4}, "metric": 1.1},
                                   {"trial_id": 3, "values": {"lora_rank": 8}, "metric": 0.95}]}),
                &ctx,
            )
            .await
            .unwrap();
        assert_eq!(out.data["table"]["best"], "lora_rank=8");
        assert!(
            out.artifacts
                .iter()
                .any(|a| a.ends_with("ablation_lora_rank.svg"))
        );
        let e = r
            .get(names::ABLATION)
            .unwrap()
            .call_json(
                json!({"param": "lora_rank", "values": [4], "preset": "lora_rank"}),
                &ctx,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn standard_draws_distinct_trials_from_hpo_and_ensemble_weights() {
        let ctx = SkillContext::new(std::env::temp_dir());
        let r = reg();
        let out = r
            .get(names::STANDARD)
            .unwrap()
            .call_json(json!({"n_trials": 4, "hpo": {"budget_remaining": 10.0, "trials_remaining": 4, "strategy": "random"}}), &ctx)
            .await
            .unwrap();
        let s = out.data["suggestions"].as_array().unwrap();
        assert_eq!(s.len(), 4);
        let lrs: std::collections::HashSet<String> = s
            .iter()
            .map(|x| x["trial_config"]["learning_rate"].to_string())
            .collect();
        assert_eq!(lrs.len(), 4);
        let out = r
            .get(names::ENSEMBLE)
            .unwrap()
            .call_json(json!({"members": [{"trial_id": 1, "eval_loss": 1.0}, {"trial_id": 2, "eval_loss": 3.0}],
                              "weighting": "inverse_loss"}), &ctx)
            .await
            .unwrap();
        assert_eq!(out.data["members"][0]["weight"], 0.75);
    }
}

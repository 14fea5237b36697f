//! ArtifactSkill: a content-addressed store of LoRA adapters with a SQLite index.
//!
//! [`ArtifactStore::store`] takes an adapter folder, a trial id, metrics and
//! tags (seed 001 §7) and registers it as the next version (`v1`, `v2`, ...)
//! of an experiment, returning its `adapter_hash` (SHA-256 over the folder,
//! framing in [`hash`]) and `stored_path` (a read-only copy inside the store).
//! Files are stored once per distinct content ("blobs"), adapters once per
//! distinct hash; the index (`index.sqlite`, WAL) holds experiments, versions,
//! trials, metrics, tags, parents and creation times. Operations: list, get,
//! best by a metric, filter, delete, gc, verify. Layout, crash safety and the
//! gc/store race are described in [`store`].
//!
//! The skills [`ArtifactSkill`] (`artifact_store`) and
//! [`ArtifactRegistrySkill`] (`artifact_registry`) expose it with the contract
//! types of [`lora_spec::contracts::artifact`]; [`register`] adds both to a registry.

mod error;
pub mod hash;
mod index;
pub mod reference;
mod skill;
pub mod store;

pub use error::{ArtifactError, Result};
pub use hash::{TreeDigest, hash_adapter_dir};
pub use index::MIGRATIONS;
pub use reference::{Selector, VersionRef};
pub use skill::{ArtifactRegistrySkill, ArtifactSkill};
pub use store::{ArtifactStore, ExperimentSummary, GcOptions, StorePhase, StoredFile};

/// Registers both artifact skills.
pub fn register(reg: &mut lora_skill::SkillRegistry) {
    reg.register(ArtifactSkill);
    reg.register(ArtifactRegistrySkill);
}

//! ArtifactSkill: content-addressed adapter store with a SQLite index.
//!
//! Filled by its own issue; see docs/ARCHITECTURE.md.

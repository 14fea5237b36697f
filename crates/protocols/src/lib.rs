//! Research protocols: ablation, curriculum, ensemble, reproducibility manifest.
//!
//! Filled by its own issue; see docs/ARCHITECTURE.md.

//! MergeSkill: streaming merge and exports (safetensors, GGUF, PyTorch .bin).
//!
//! Filled by its own issue; see docs/ARCHITECTURE.md.

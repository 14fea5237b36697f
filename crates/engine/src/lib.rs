//! The tensor engine on libtorch: Llama-family model, LoRA, trainer, generation.
//!
//! Filled by its own issue; see docs/ARCHITECTURE.md.

//! MergeSkill: streaming LoRA merge and exports (safetensors, GGUF, PyTorch `.bin`).
//!
//! - [`adapter`]: PEFT adapters on disk resolved into per-weight LoRA modules.
//! - [`merge`]: `W' = W + scale·B·A` streamed tensor by tensor from memory-mapped safetensors.
//! - [`hf`]: Hugging Face folders out (sharded safetensors or `.bin`, config, tokenizer, template).
//! - [`torch_bin`]: `torch.save`-compatible zip + pickle state dicts.
//!
//! Format writers are pure Rust (no libtorch), so they test fast.

pub mod adapter;
pub mod combine;
pub mod dtype;
pub mod error;
pub mod export;
pub mod gemm;
pub mod gguf;
pub mod hf;
pub mod merge;
pub mod skill;
pub mod st;
pub mod torch_bin;
pub mod validate;

pub use adapter::{Adapter, AdapterConfig, LoraModule};
pub use dtype::DType;
pub use error::{MergeError, Result};
pub use export::{ExportKind, ExportRequest, ExportSummary, export, preflight};
pub use merge::MergedModel;
pub use skill::{MergeSkill, register};
pub use st::{SafetensorsSet, TensorSpec};

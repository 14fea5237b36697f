//! GGUF export: the container writer, ggml quantizers, the Hugging Face → GGUF
//! model conversion with its embedded tokenizer, and GGUF LoRA adapters.

pub mod convert;
pub mod lora;
pub mod quant;
pub mod tokenizer;
pub mod writer;

pub use convert::{GgufReport, HfConfig};
pub use writer::GgmlType;

//! The tensor engine on libtorch (tch): the Llama-family model (Llama 2/3,
//! Mistral, Qwen2) loaded from Hugging Face folders or GGUF files, exact to
//! transformers' logits, with a KV cache and sampling-based generation.
//!
//! Layout: [`config`] (config.json), [`weights`] (safetensors in/out and the
//! load report), [`model`] (forward pass and KV cache), [`nn`] (Linear with a
//! LoRA slot, RMSNorm, Embedding), [`lora`] (the adapter layer), [`tokenizer`]
//! (tokenizer.json, special tokens, chat template), [`generate`] (sampling),
//! [`decode`] (the one-token decode step of one sequence on the CPU),
//! [`gguf`] (GGUF reader, dequantisation), [`gguf_import`] (GGUF → HF folder),
//! [`hub`] (model names: local folders and the Hugging Face cache), [`kernels`]
//! (fused elementwise kernels of the training pass, on libtorch's OpenMP team),
//! [`matmul`] (the training pass's f32 GEMM: the `gemm` crate on that team, or libtorch's).

#![cfg_attr(test, allow(clippy::unwrap_used))] // Tests may unwrap; library code may not.

pub mod attention;
pub mod config;
pub mod decode;
pub mod error;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod gguf_import;
pub mod hub;
pub mod kernels;
pub mod lora;
pub mod matmul;
pub mod model;
pub mod nn;
pub mod tokenizer;
pub mod weights;

#[cfg(test)]
mod gguf_tests;
#[cfg(test)]
mod parity_tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use config::{Architecture, HfConfig, ModelConfig, RopeScaling};
pub use decode::FastDecoder;
pub use error::{EngineError, Result};
pub use generate::{FinishReason, Generation, GenerationConfig, generate};
pub use gguf_import::{ImportReport, import_gguf};
pub use lora::LoraLayer;
pub use model::{KvCache, LayerContext, LlamaModel};
pub use nn::Linear;
pub use tokenizer::{ChatMessage, TextTokenizer};
pub use weights::{LoadReport, TensorStore};

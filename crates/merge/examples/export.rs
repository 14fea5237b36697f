//! `cargo run --release -p lora-merge --example export -- BASE ADAPTER|- KIND QUANT OUT`:
//! the library's export without the CLI's dependency tree (used by the benchmark, which
//! measures this crate; `lora-trainer export` calls the same function).
#![allow(clippy::print_stdout, clippy::print_stderr)] // an example binary reports on the terminal

use lora_merge::export::{ExportKind, ExportRequest, export};
use lora_spec::contracts::merge::GgufQuantization;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!(
            "usage: export BASE ADAPTER|- safetensors|pytorch|gguf|gguf-lora f32|f16|bf16|q8_0|q4_k_m OUT"
        );
        return ExitCode::from(2);
    }
    let kind = match a[3].as_str() {
        "safetensors" => ExportKind::Safetensors,
        "pytorch" => ExportKind::PytorchBin,
        "gguf" => ExportKind::Gguf,
        _ => ExportKind::GgufLora,
    };
    let quant = match a[4].as_str() {
        "f32" => GgufQuantization::F32,
        "f16" => GgufQuantization::F16,
        "bf16" => GgufQuantization::Bf16,
        "q8_0" => GgufQuantization::Q8_0,
        _ => GgufQuantization::Q4KM,
    };
    let adapter = (a[2] != "-").then(|| PathBuf::from(&a[2]));
    let mut req = ExportRequest::new(&a[1], adapter, &a[5], kind);
    req.quant = quant;
    req.allow_missing_chat_template = true;
    let t = std::time::Instant::now();
    match export(&req, &mut |_, _, _| Ok(())) {
        Ok(s) => {
            println!(
                "{} tensors ({} adapted), {:.1} MB, {:?}, {:.2}s",
                s.tensors,
                s.adapted_tensors,
                s.bytes as f64 / 1e6,
                s.gguf_types,
                t.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

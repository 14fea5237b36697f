//! Benchmark driver: profiles a dataset with `lora_dataset::analyze` and prints one JSON
//! line with the anchor's fields (see /work/shared/anchors/dataset_anchor.py), the
//! wall time and the peak RSS, so the two can be compared side by side.
//!
//! Usage: `profile_bench FILE [--threads N] [--tokenizer T] [--near-dups]`

#![allow(clippy::print_stdout, clippy::print_stderr)] // reason: a benchmark binary reports on stdout

use lora_dataset::{AnalyzeEnv, analyze};
use lora_spec::contracts::dataset::DatasetAnalyzeInput;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(file) = args.first() else {
        eprintln!("usage: profile_bench FILE [--threads N] [--tokenizer T] [--near-dups]");
        return std::process::ExitCode::from(2);
    };
    let mut input = DatasetAnalyzeInput::new(file.clone());
    let mut env = AnalyzeEnv::default();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--threads" => {
                env.read.threads = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(0);
                i += 1;
            }
            "--tokenizer" => {
                input.tokenizer_name = args.get(i + 1).cloned();
                i += 1;
            }
            "--near-dups" => input.near_duplicates = true,
            other => {
                eprintln!("unknown option {other}");
                return std::process::ExitCode::from(2);
            }
        }
        i += 1;
    }
    let t0 = std::time::Instant::now();
    match analyze(&input, &env, &mut |_, _| Ok(())) {
        Ok(a) => {
            let p = a.profile;
            let out = serde_json::json!({
                "impl": "lora-dataset",
                "seconds": (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
                "total_samples": p.total_samples,
                "columns": p.columns,
                "has_instruction": p.has_instruction,
                "has_output": p.has_output,
                "duplicates_found": p.duplicates_found,
                "avg_tokens": p.avg_tokens,
                "max_tokens": p.max_tokens,
                "invalid_rows": p.invalid_rows,
                "record_format": p.record_format,
                "near_duplicates_found": p.near_duplicates_found,
                "token_counter": p.token_counter.kind,
                "peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
            });
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
